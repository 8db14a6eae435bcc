import os
import stat

import pytest

from udg_lib import io


def test_staged_dir_replaces_the_old_folder_only_on_success(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with io.staged_dir(target) as staging:
            (staging / "new.txt").write_text("half")
            raise RuntimeError("training crashed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp folder left behind
    assert (target / "old.txt").exists() and not (target / "new.txt").exists()
    with io.staged_dir(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o777 & ~io.current_umask()


def test_atomic_files_get_the_usual_mode_and_no_partial_file(tmp_path):
    path = io.write_json(tmp_path / "metrics.json", {"a": 1})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~io.current_umask()
    with pytest.raises(ValueError):
        with io.atomic_path(tmp_path / "table.csv") as tmp:
            tmp.write_text("half")
            raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
