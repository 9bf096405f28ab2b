"""The cost half of `emoloop bench personalization`, small: personal versions of the bundled
model stored, each user's first request served by their own head through the real engine."""
from service.bench.personalization import _cost_bench


def test_personal_versions_are_small_and_served_from_disk_on_first_request(tmp_path):
    cost = _cost_bench(tmp_path / "store", versions=40, probes=5)
    assert cost["bytes_per_version_max"] <= 1_000_000
    assert cost["model_files"] == 41  # the global version and forty personal ones
    assert cost["first_requests_served_personal"] and cost["probes"] == 5
    assert cost["heads_cached"] <= cost["cache_size"]
