"""benchmarks/speed.py files each machine kind's table under a section of its own in BENCHMARKS.md."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_speed", None)


@pytest.mark.parametrize("bf16, flags, isa, key", [
    (False, [], None, "cpu-avx2"),
    (False, ["amx_bf16", "avx512_bf16"], "AVX2", "cpu-avx2"),          # the AVX2 stand-in on an AMX CPU
    (True, ["avx512_bf16", "avx512f"], None, "cpu-avx512-bf16"),
    (True, ["amx_bf16", "amx_tile", "avx512_bf16"], None, "cpu-amx-bf16"),
    (True, ["amx_bf16", "amx_tile", "avx512_bf16"], "AVX512_CORE_BF16", "cpu-avx512-bf16"),
    (True, ["amx_bf16", "amx_tile", "avx512_bf16"], "avx512_core_amx", "cpu-amx-bf16"),
])
def test_machine_kind_names_the_section(speed, monkeypatch, bf16, flags, isa, key):
    monkeypatch.setattr(speed, "has_bf16", lambda device: bf16)
    monkeypatch.setattr(speed, "cpu_description", lambda: {"cpu": "x", "cores": 2, "mem_gib": 1.0,
                                                           "bf16_flags": flags})
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert speed.machine_key("cpu") == key
    assert speed.machine_key("cuda") == "cuda"


def test_a_section_is_replaced_in_place_and_a_new_kind_appended(speed, tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# B\n\n## Speed of every task (`make bench`)\n\n<!-- bench:begin cpu-avx2 -->\nold\n"
                   "<!-- bench:end cpu-avx2 -->\n\n## After\n")
    speed.write_section(doc, "cpu-avx2", "new\n")
    speed.write_section(doc, "cpu-amx-bf16", "amx\n")
    text = doc.read_text()
    assert "old" not in text and text.count("## Speed of every task") == 1
    assert "<!-- bench:begin cpu-avx2 -->\nnew\n<!-- bench:end cpu-avx2 -->\n\n## After" in text
    assert text.endswith("<!-- bench:begin cpu-amx-bf16 -->\namx\n<!-- bench:end cpu-amx-bf16 -->\n")
