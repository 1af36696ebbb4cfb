"""train.py --cuda_graphs: the step replayed as CUDA graphs (zo/graphs.py). Without CUDA, or with a
step that cannot be captured, it is one error line, exit status 2, before anything is written."""
import pytest
import torch

import train
from data import flags


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_graphs_without_cuda_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--task", "SST2", "--max_steps", "2", "--cuda_graphs", "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: CUDA graphs need a CUDA device (--cuda_graphs"), err
    assert not out.exists()


@pytest.mark.parametrize("extra,named", [(["--trainer", "fo"], "--trainer fo"), (["--n_spsa", "2"], "--n_spsa"),
                                         (["--optimizer", "adam"], "--optimizer adam"),
                                         (["--perturbation", "reference"], "--perturbation reference")])
def test_cuda_graphs_name_what_they_cannot_capture(monkeypatch, extra, named):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the device check, on any machine
    args = flags.parse_args(["--task", "SST2", "--cuda_graphs", "--device", "cuda", *extra])
    with pytest.raises(ValueError, match=f"not with {named}.*\\(--cuda_graphs\\)"):
        flags.resolve(args, "opt")
    plain = flags.parse_args(["--task", "SST2", "--cuda_graphs", "--device", "cuda"])
    flags.resolve(plain, "opt")  # a plain ZO-SGD run passes
