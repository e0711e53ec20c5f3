"""Whole-file writes of per-sample logs: atomic, and safe for two writers of one file."""

import json
import threading

from harness.records import is_reference, write_jsonl


def test_write_jsonl_writers_of_one_file_do_not_interleave(tmp_path):
    """Two writers of the same per-sample log (two drivers on one results folder) each write a
    temporary file of their own: the file ends as one complete write, and no temporary is left."""
    path = tmp_path / "samples" / "cell.jsonl"

    def rows(w):
        for i in range(2000):
            yield {"writer": w, "i": i, "pad": "x" * 50}
    threads = [threading.Thread(target=write_jsonl, args=(path, rows(w))) for w in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 2000 and len({r["writer"] for r in lines}) == 1
    assert [r["i"] for r in lines] == list(range(2000))
    assert [p.name for p in path.parent.iterdir()] == ["cell.jsonl"]

    def broken():
        yield {"ok": 1}
        raise RuntimeError("the producer failed")
    try:
        write_jsonl(path, broken())
    except RuntimeError:
        pass
    assert len(path.read_text().splitlines()) == 2000  # the last complete write is kept
    assert [p.name for p in path.parent.iterdir()] == ["cell.jsonl"]


def test_is_reference_is_the_registrys_flag():
    """The engine's ``reference`` key wins; a record written before it is the reference when the
    registry says its method is (``Method.reference``), never by the method's name."""
    from harness.registry import available_methods, reference_method

    ref = reference_method()
    assert available_methods()[ref].reference
    assert is_reference({"method": ref}) and is_reference({"method": "rtn", "reference": True})
    assert not is_reference({"method": ref, "reference": False})
    assert not is_reference({"method": "rtn"}) and not is_reference({"method": "no-such-method"})
