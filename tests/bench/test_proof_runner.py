"""The GPU proof's section runner on the CPU, in seconds, with real child processes (plain Python, no torch): one
deadline caps every section, a hung section is killed and a crashed one recorded while the rest still run, each
section has its own log, and the report on disk is replaced whole after every section."""
import json
import os
import time

from cityseg.bench.proof_runner import Proof, Section

# a child that proves the report was on disk, complete, before it started: it prints the sections it finds there
READ_REPORT = "import json, sys; print('seen:', sorted(json.load(open(sys.argv[1])).get('group', {})))"


def python_section(name: str, code: str, cap: float, *args: str) -> Section:
    """A section whose child runs `code` and writes {"name": ...} to the --result path it is given last."""
    script = f"import json, sys\n{code}\njson.dump({{'name': {name!r}}}, open(sys.argv[-1], 'w'))"
    return Section(name, ["-c", script, *args], cap)


def test_sections_run_in_order_under_one_deadline_each_logged_and_recorded(tmp_path):
    report_path = tmp_path / "report.json"
    proof = Proof(report_path, tmp_path / "work", deadline_s=2.5, min_start_s=0.5)
    proof.record("machine", {"cpus": 1})
    inode = report_path.stat().st_ino
    started = time.monotonic()
    proof.run(python_section("group.first", "print('first says hi')", 30))
    assert report_path.stat().st_ino != inode  # replaced whole (os.replace), not rewritten in place
    proof.run(python_section("group.second", READ_REPORT, 30, str(report_path)))
    proof.run(python_section("group.crashes", "print('about to fail'); sys.exit(3)", 30))
    proof.run(python_section("group.hangs", "print('hanging', flush=True); import time; time.sleep(600)", 60))
    proof.run(python_section("group.late", "print('late')", 30))
    assert time.monotonic() - started < 10  # the hang was stopped at the deadline (2.5 s), not its own 60 s cap

    report = json.loads(report_path.read_text())
    assert report["order"] == ["group.first", "group.second", "group.crashes", "group.hangs", "group.late"]
    group = report["group"]
    assert group["first"]["name"] == "group.first" and group["second"]["name"] == "group.second"
    assert group["crashes"]["error"] == "exited 3: about to fail"
    assert group["hangs"]["timed_out"] and "the proof's deadline" in group["hangs"]["error"], group["hangs"]
    assert group["hangs"]["limit_s"] < 2.5
    assert group["late"]["skipped"].startswith("not started: "), group["late"]
    logs = {name: open(group[name]["log"]).read() for name in ("first", "second", "crashes", "hangs")}
    assert "first says hi" in logs["first"] and "seen: ['first']" in logs["second"]  # on disk before it started
    assert "about to fail" in logs["crashes"] and "hanging" in logs["hangs"]  # a killed child keeps its log
    assert len({group[name]["log"] for name in logs}) == 4  # one log file per section
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_section_is_capped_by_its_own_limit_and_the_next_one_still_runs(tmp_path):
    proof = Proof(tmp_path / "report.json", tmp_path / "work", deadline_s=60)
    hung = proof.run(python_section("hangs", "import time; time.sleep(600)", 1))
    after = proof.run(python_section("after", "", 30))
    assert hung["timed_out"] and "the section's cap" in hung["error"] and hung["section_s"] < 10, hung
    assert after["name"] == "after"
    bad = proof.run(Section("unreadable", ["-c", "print('no result written')"], 30))
    assert bad["error"].startswith("no readable result: "), bad
