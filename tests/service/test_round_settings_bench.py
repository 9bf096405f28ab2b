"""`emoloop bench round-settings`: variants are the configured learner with named keys changed,
and a misspelt key or a bad value stops the command before anything heavy loads."""
import pytest

from service import cli
from service.bench.round_settings import learner_variants, parse_variant


def test_a_variant_names_the_keys_it_changes():
    assert parse_variant("batch_size=32, ewc_lambda=3e4") == {"batch_size": "32",
                                                               "ewc_lambda": "3e4"}
    with pytest.raises(ValueError, match="key=value"):
        parse_variant("batch_size")


def test_variants_change_only_their_keys_of_the_configured_learner():
    configured, changed = learner_variants([{"batch_size": "32", "distill_weight": "0"}])
    assert (changed.batch_size, changed.distill_weight) == (32, 0.0)
    assert changed.model_dump() == {**configured.model_dump(), "batch_size": 32,
                                    "distill_weight": 0.0}


@pytest.mark.parametrize("variant, named", [("bacth_size=32", "bacth_size"),
                                            ("batch_size=many", "batch_size")])
def test_a_bad_variant_is_refused_before_the_bench_starts(variant, named, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the bench started")

    monkeypatch.setattr("service.bench.round_settings.run_round_settings_bench", never)
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "round-settings", "--variant", variant])
    assert "emoloop bench round-settings" in str(stop.value) and named in str(stop.value)
