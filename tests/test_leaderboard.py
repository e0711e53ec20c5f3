"""The accuracy leaderboard's notes: a failed cell that later succeeded is not reported as failed."""

import json

from harness.leaderboard import unresolved_failures, write_leaderboard


def _rec(method, scheme, task, status="ok", value=50.0):
    return {"model": "m", "method": method, "scheme": scheme, "task": task, "metric": "accuracy",
            "value": value if status == "ok" else None, "status": status, "device": "cpu",
            "kernel": "simulated", "batch_size": 8, "n": 10, "stderr": 1.0, "error": "boom" if status == "failed" else None}


def test_only_failures_not_retried_successfully_are_reported(tmp_path):
    recs = [_rec("fp16", "w16a16", "t"),
            _rec("rtn", "w4a4", "t", status="failed"), _rec("rtn", "w4a4", "t", value=40.0),  # retried: ok
            _rec("gptq", "w4a4", "t", value=45.0), _rec("gptq", "w4a4", "t", status="failed"),  # broke later
            _rec("awq", "w4a4", "t", status="failed")]
    left = unresolved_failures(recs)
    assert sorted(r["method"] for r in left) == ["awq", "gptq"]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = write_leaderboard(tmp_path)["md"].read_text()
    assert "2 failed record(s)" in md and "rtn/w4a4" not in md.split("failed record(s)")[1]
