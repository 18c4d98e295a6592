"""The top-level `kernels/` folder never takes over the name `kernels`, which Hugging Face's package owns.

transformers (>= 5.25) imports Hugging Face's `kernels`. With the repository root first on sys.path (`python -m
pytest`, `python -m minipt`, a script saved in the root) Python finds our folder first; it must step aside. Each
case runs in a fresh interpreter started in the repository root, so sys.path[0] is the root, as for a user.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(code, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def stand_in_site(tmp_path):
    """A site folder holding a stand-in `kernels` distribution (package and metadata), as pip would install it."""
    package = tmp_path / "kernels"
    package.mkdir()
    (package / "__init__.py").write_text("OWNER = 'stand-in'\n__version__ = '0.0.1'\n")
    (package / "layers.py").write_text("NAME = 'stand-in layers'\n")
    info = tmp_path / "kernels-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.0.1\n")
    return tmp_path


def test_import_kernels_from_the_root_gives_the_installed_package(stand_in_site):
    out = run_in_root(
        """
        import os, sys
        assert os.path.abspath(sys.path[0] or os.curdir) == os.getcwd()   # the root is first
        import kernels
        import kernels.layers
        print(kernels.OWNER, kernels.layers.NAME, kernels.__file__)
        import minipt.kernels, torch
        from minipt.kernels import prompt_concat
        assert callable(prompt_concat) and hasattr(torch.ops.minipt, "prompt_concat")
        assert "kernels.prompt_concat" not in sys.modules   # our op file never runs under the other name
        print(minipt.kernels.__name__, sys.modules["kernels"] is kernels)
    """,
        pythonpath=stand_in_site,
    )
    assert f"stand-in stand-in layers {stand_in_site / 'kernels' / '__init__.py'}" in out
    assert "minipt.kernels True" in out


def test_without_an_installed_kernels_the_name_holds_nothing_of_ours():
    # What Python gives for an empty folder named kernels: a namespace package with no file, no version and
    # nothing to import from it, which transformers' availability probe reads as "not installed".
    out = run_in_root("""
        import os, sys
        sys.path[:] = [p for p in sys.path if "-packages" not in p]   # no installed `kernels` anywhere
        import kernels
        print(getattr(kernels, "__file__", None), getattr(kernels, "__version__", "N/A"), list(kernels.__path__))
        for name in ("prompt_concat", "get_kernel"):
            try:
                exec(f"from kernels import {name}")
            except ImportError:
                print("no", name)
    """)
    assert out.split("\n")[:3] == ["None N/A []", "no prompt_concat", "no get_kernel"]


def test_minipt_first_then_kernels_registers_the_custom_ops_once(stand_in_site):
    # minipt.kernels already imported (its ops registered); importing `kernels` must not run our op file again,
    # which would fail registering minipt::prompt_concat a second time.
    out = run_in_root(
        """
        import sys
        import minipt
        import kernels
        import minipt.kernels.prompt_concat
        op_file = sys.modules["minipt.kernels.prompt_concat"]
        print(kernels.OWNER, op_file.__name__, [m for m in sys.modules if m.startswith("kernels")])
    """,
        pythonpath=stand_in_site,
    )
    assert out.strip() == "stand-in minipt.kernels.prompt_concat ['kernels']"


def test_transformers_and_peft_import_from_the_root_and_build_a_gpt2():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = run_in_root("""
        import transformers, peft, torch
        import minipt
        from minipt import GPT, PromptTuning
        config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=16, vocab_size=61,
                                         bos_token_id=0, eos_token_id=0)
        hf_model = transformers.GPT2LMHeadModel(config).eval()
        model = GPT.from_hf(hf_model)
        pt = PromptTuning(model, n_prompt=3)
        idx = torch.randint(0, 61, (2, 5))
        logits, _ = pt(idx)
        print(tuple(logits.shape))
    """)
    assert out.strip().endswith("(2, 5, 61)")
