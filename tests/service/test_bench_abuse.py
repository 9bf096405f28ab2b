"""`emoloop bench abuse`, a hundredth of its size and with 1 s deadlines: the real server cuts
every stalled connection with a 408 and the well-behaved client is answered throughout."""
from service.bench.abuse import run_abuse_bench
from storage.settings import get_settings


def test_a_small_run_cuts_every_stalled_connection_and_answers_the_client(monkeypatch):
    for name in ("HEADER_TIMEOUT_S", "BODY_TIMEOUT_S", "BODY_MAX_TIMEOUT_S"):
        monkeypatch.setenv(f"EMOLOOP_API__{name}", "1")
    get_settings.cache_clear()
    try:
        report = run_abuse_bench(scale=0.01)
    finally:
        get_settings.cache_clear()
    assert len(report["scenarios"]) == 4
    for result in report["scenarios"].values():
        assert result["stalled_opened"] == result["stalled"] > 0
        assert result["stalled_answers"] == {"408": result["stalled"]}
        # Closed by the server; how late past its deadline depends on the host's load, which
        # the bench reports (closed_in_time) but a test cannot choose.
        assert result["closed"] == result["stalled"]
        assert result["closed_in_time"] <= result["closed"]
        assert result["requests"] > 0 and result["answered"] == result["requests"]
    assert any(line.startswith("server RSS growth") for line in report["lines"])
