"""The export's model card states its privacy and leaves out what the config does not say."""

from server.db.read import EpsilonSummary
from server.model_card import Provenance, model_card, privacy_line


def _provenance(config, epsilon=None, central=None):
    return Provenance(run_id=7, uuid=None, tag="t1", status="completed", aggregator="flora", config=config, round=3,
                      clients=5, sampled=12, epsilon=epsilon, central_epsilon=central)


def test_no_dp_says_so_and_central_dp_names_its_settings():
    assert privacy_line(_provenance({})) == "none: no differential privacy in this run (ε = ∞)"
    central = {"dp-central-clip": 0.5, "dp-central-noise": 1.1, "dp-delta": 1e-5}
    line = privacy_line(_provenance(central, EpsilonSummary(epsilon=2.0, delta=1e-5, clients=3)))
    assert line == ("local DP-SGD: ε ≤ 2.000 at δ = 1e-05 (the largest of 3 clients' ε); central DP: "
                    "updates clipped to 0.5, noise multiplier 1.1")
    assert privacy_line(_provenance(central, central=0.8125)) == (
        "central DP: user-level ε = 0.812 at δ = 1e-05 through round 3, updates clipped to 0.5, noise multiplier 1.1")


def test_a_merged_card_names_its_run_and_truncation_and_skips_unknown_keys():
    card = model_card(_provenance({"num-server-rounds": 3, "ranks": "4,8", "max-rank": 8}), kind="merged",
                      base_ref="/models/base", base_label="base", rank=None, relative_error=0.0)
    assert "library_name: peft" not in card and card.startswith("---\nbase_model: /models/base\n")
    assert "| run | 7, tag `t1`, completed |" in card and "| rounds | 3 of 3" in card
    assert "| client ranks | `4,8`, max-rank 8 |" in card and "local training" not in card
    assert "AutoModelForCausalLM.from_pretrained(DIR)" in card
    truncated = model_card(_provenance({}), kind="adapter", base_ref="b", base_label="b", rank=5,
                           relative_error=0.25)
    assert "| approximation | 0.250000 (truncated SVD at rank 5) |" in truncated
