"""offload-convert's packed layout: identical outputs, memory-mapped experts, and a model whose experts
exceed a RAM cap still generates."""
import subprocess
import sys
import textwrap

import torch
from hf_tiny import save_tiny
from lying import DEMO, ask

import offload
from offload.packed import convert


def test_convert_then_load_is_identical(tmp_path):
    save_tiny("gpt_oss", tmp_path / "src")
    packed = tmp_path / "packed"
    result = subprocess.run([sys.executable, "-m", "offload.cli.convert", str(tmp_path / "src"), str(packed)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (packed / "experts.bin").is_file() and not list(packed.glob("model*.safetensors"))
    ids = torch.randint(1, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    reference = offload.load(tmp_path / "src").forward(ids)
    assert torch.equal(offload.load(packed).forward(ids), reference)
    assert torch.equal(offload.load(packed, cache_experts=2).forward(ids), reference)
    again = subprocess.run([sys.executable, "-m", "offload.cli.convert", str(tmp_path / "src"), str(packed)],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_experts_larger_than_ram_cap_still_generate(tmp_path):
    """RLIMIT_DATA caps anonymous memory below the experts' size: the packed, memory-mapped store still
    generates (file-backed pages do not count), while loading the experts into RAM fails."""
    save_tiny("mixtral", tmp_path / "src", hidden_size=256, intermediate_size=2048, num_local_experts=8)
    convert(tmp_path / "src", tmp_path / "packed")
    expert_bytes = (tmp_path / "packed" / "experts.bin").stat().st_size
    assert expert_bytes > 190 * 2**20
    script = textwrap.dedent(f"""
        import resource, sys, torch, offload
        model_dir, mode = sys.argv[1], sys.argv[2]
        usage = int(open('/proc/self/statm').read().split()[5]) * resource.getpagesize()  # data segment now
        cap = usage + {expert_bytes} // 2
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
        try:
            model = offload.load(model_dir, cache_experts=2)
            out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
        except MemoryError:
            print("out of memory"); sys.exit(3)
        print("ok", out.shape[1])
    """)
    mapped = subprocess.run([sys.executable, "-c", script, str(tmp_path / "packed"), "packed"],
                            capture_output=True, text=True)
    assert mapped.returncode == 0 and "ok 7" in mapped.stdout, mapped.stderr[-2000:]
    in_ram = subprocess.run([sys.executable, "-c", script, str(tmp_path / "src"), "ram"],
                            capture_output=True, text=True)
    assert in_ram.returncode != 0, "the RAM cap did not bind: the test proves nothing"


def test_convert_keeps_the_prefetch_predictors(tmp_path):
    from pathlib import Path

    import offload.demo

    packed = tmp_path / "packed"
    result = subprocess.run([sys.executable, "-m", "offload.cli.convert", str(Path(offload.demo.__file__).parent),
                             str(packed)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (packed / "predictor.safetensors").is_file()
    hooks = offload.load(packed, cache_experts=4).decoder.hooks
    assert [sorted(hook.predictors) for hook in hooks] == [[2, 3, 4, 5]]


def test_convert_keeps_the_mtp_layer(tmp_path):
    """The MTP layer used to be dropped, so speculative="mtp" failed on a converted model."""
    packed = convert(DEMO, tmp_path / "packed")
    source = offload.load("demo")
    expected = ask(source, speculative="mtp")
    assert expected == ask(source)
    assert ask(offload.load(packed), speculative="mtp") == expected
    assert ask(offload.load(packed, cache_experts=4), speculative="mtp") == expected
