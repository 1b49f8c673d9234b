"""The allocator switch: which malloc a process runs on, and the re-execution onto tcmalloc."""

import subprocess
import sys

import pytest

from recgpt_jax import allocator
from recgpt_jax.errors import UserError

MAPS = {
  "glibc": "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n",
  "tcmalloc": "7f00-7f01 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n",
  "jemalloc": "7f00-7f01 r-xp 0 08:01 3 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n",
}


@pytest.mark.parametrize("name", list(MAPS))
def test_loaded_reads_the_mapped_library(name):
  assert allocator.loaded(MAPS["glibc"] + MAPS[name]) == name


def test_find_tcmalloc_searches_the_given_dirs(tmp_path):
  assert allocator.find_tcmalloc((str(tmp_path),)) is None
  (tmp_path / "libtcmalloc.so.4").write_bytes(b"")
  assert allocator.find_tcmalloc((str(tmp_path / "missing"), str(tmp_path))) == str(tmp_path / "libtcmalloc.so.4")


def test_use_rejects_bad_choices_and_a_missing_library(monkeypatch):
  monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
  monkeypatch.setattr(allocator, "loaded", lambda: "glibc")
  monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("must not re-execute"))
  with pytest.raises(UserError, match="--allocator must be one of"):
    allocator.use("jemalloc")
  with pytest.raises(UserError, match="no libtcmalloc found.*apt install"):
    allocator.use("tcmalloc")
  assert allocator.use("auto") is None and allocator.use("system") is None


def test_use_reexecutes_once_with_tcmalloc_preloaded(monkeypatch):
  calls = []
  monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
  monkeypatch.setattr(allocator, "loaded", lambda: "glibc")
  monkeypatch.setattr(allocator.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
  monkeypatch.delenv(allocator.REEXEC_MARK, raising=False)
  monkeypatch.setenv("LD_PRELOAD", "/lib/other.so")
  allocator.use("auto")
  ((exe, argv, env),) = calls
  assert exe == sys.executable and argv == list(sys.orig_argv)
  assert env["LD_PRELOAD"] == "/lib/libtcmalloc_minimal.so.4 /lib/other.so" and env[allocator.REEXEC_MARK] == "1"
  assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40
  monkeypatch.setenv(allocator.REEXEC_MARK, "1")  # the re-executed process: tcmalloc did not load
  allocator.use("auto")
  assert len(calls) == 1
  with pytest.raises(UserError, match="did not load"):
    allocator.use("tcmalloc")


def test_a_real_process_ends_up_on_tcmalloc_when_the_machine_has_it():
  code = "from recgpt_jax import allocator; allocator.use('auto'); print(allocator.loaded())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
  assert out == ("tcmalloc" if allocator.find_tcmalloc() else "glibc")


def test_a_script_on_stdin_is_not_reexecuted(monkeypatch):
  monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
  monkeypatch.setattr(allocator, "loaded", lambda: "glibc")
  monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("must not re-execute"))
  monkeypatch.delenv(allocator.REEXEC_MARK, raising=False)
  monkeypatch.setattr(allocator.sys, "argv", ["-"])
  assert allocator.use("auto") is None
  with pytest.raises(UserError, match="stdin"):
    allocator.use("tcmalloc")
