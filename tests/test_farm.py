"""The device farm: tracker + servers on loopback, tuning through RPCRunner that survives a killed server
and resumes from its database."""

import threading
import time

import pytest

from tir_schedules import shuffle, tuning
from tvm_lut.app import cli
from tvm_lut.errors import OptionError
from tvm_lut.targets import host_target
from tvm_lut.targets.farm import Farm, check_bind_host, parse_address

TARGET = host_target()


@pytest.fixture()
def farm3(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_LUT_FARM_DIR", str(tmp_path / "farm"))
    farm = Farm().start(x86=3, log=lambda *_: None)
    yield farm
    farm.stop()


def _kill_when_recorded(db_dir: str, victim, out: dict, timeout_s: float = 240.0) -> None:
    """Kill ``victim`` once the first batch of records is in the database (tuning is under way)."""
    deadline = time.time() + timeout_s
    path = f"{db_dir}/database_tuning_record.json"
    while time.time() < deadline:
        try:
            with open(path) as f:
                if sum(1 for _ in f) >= 1:
                    break
        except OSError:
            pass
        time.sleep(0.2)
    out["records_when_killed"] = sum(1 for _ in open(path))
    victim.stop()


@pytest.mark.slow  # about 75 s with its three-server farm; the farm's tuning and status stay in the default suite
def test_tuning_survives_a_killed_server_and_resumes(farm3, tmp_path):
    lanes = shuffle.isa_for(TARGET, grouped=False).lanes  # 64 (128 on an AVX2-only host) row blocks x 64 tiles
    func = shuffle.lookup(4096, 16, 256, lanes, 4)  # a roomy space
    db = str(tmp_path / "db")
    spec = tuning.RemoteDevices(farm3.address, "x86")
    assert spec.servers() == 3
    victim = farm3.servers("x86")[0]
    seen: dict = {}
    killer = threading.Thread(target=_kill_when_recorded, args=(db, victim, seen))
    killer.start()
    ran = tuning.tune_kernel(func, TARGET, db, trials=16, farm=spec)
    killer.join()
    assert not victim.alive() and seen["records_when_killed"] >= 1
    assert farm3.registered() == {"x86": 2}  # the tracker dropped the dead server
    done = tuning.valid_records(func, db)
    # every completed trial was kept; only trials in flight on the killed server may be lost
    assert ran == done and 8 <= done <= 16
    # a re-run resumes: it tops the database up towards 16 on the two servers left, not 16 more
    # (a candidate measured again by the new search is not counted twice)
    added = tuning.tune_kernel(func, TARGET, db, trials=16, farm=spec)
    now = tuning.valid_records(func, db)
    assert now == done + added and now <= 16 and (added > 0 or done == 16)
    assert tuning.tune_kernel(func, TARGET, db, trials=now, farm=spec) == 0  # complete: nothing runs
    assert 0 < tuning.tune_kernel(func, TARGET, db, trials=now + 4, farm=spec) <= 4
    assert tuning.best_from_database(func, TARGET, db) is not None


def test_status_and_stop(farm3, capsys):
    text = farm3.status_text()
    assert "key x86: 3 registered" in text and text.count("running") == 4
    farm3.servers()[1].stop()
    assert "DEAD" in Farm.load().status_text()
    pids = [s for s in farm3.services]
    assert cli.main(["farm", "stop"]) == 0
    assert all(not s.alive() for s in pids)
    with pytest.raises(OptionError, match="no farm running"):
        Farm.load()


def test_start_refuses_a_second_farm(farm3):
    with pytest.raises(OptionError, match="already running"):
        Farm().start(x86=1)


def test_non_loopback_needs_the_flag_and_warns(capsys):
    with pytest.raises(OptionError, match="--allow-remote"):
        check_bind_host("0.0.0.0", allow_remote=False)
    check_bind_host("0.0.0.0", allow_remote=True)
    assert "no authentication" in capsys.readouterr().err
    check_bind_host("127.0.0.1", allow_remote=False)  # loopback: silent
    assert capsys.readouterr().err == ""


def test_bad_farm_arguments(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TVM_LUT_FARM_DIR", str(tmp_path / "farm"))
    with pytest.raises(OptionError, match="HOST:PORT"):
        parse_address("localhost")
    assert cli.main(["farm", "status"]) == 2
    assert "no farm running" in capsys.readouterr().err
    assert cli.main(["farm", "start", "--x86", "0"]) == 2
    assert "at least one server" in capsys.readouterr().err
    assert cli.main(["farm", "start", "--host", "0.0.0.0"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    assert not (tmp_path / "farm" / "farm.json").exists()


@pytest.mark.parametrize("args, message", [
    (["--target", "arm"], "cannot run on this machine"),  # nowhere to measure aarch64 code without a farm
    (["--farm", "127.0.0.1:1", "--key", "arm64"], "arm64 servers run --target arm builds"),
    (["--farm", "127.0.0.1:1", "--target", "cam"], "CAM simulator"),
    (["--farm", "nohostport"], "HOST:PORT"),
])
def test_tune_rejects_bad_farm_options_before_any_work(tmp_path, capsys, args, message):
    db = tmp_path / "db"
    assert cli.main(["tune", str(tmp_path / "missing.onnx"), "--calib", str(tmp_path / "missing.npz"),
                     "--db", str(db), *args]) == 2
    assert message in capsys.readouterr().err
    assert not db.exists()
