"""train.py --cuda_graphs: the step replayed as CUDA graphs (zo/graphs.py). Without CUDA, or with a
step that cannot be captured, it is one error line, exit status 2, before anything is written."""

import pytest
import torch

import train
from program import flags


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_graphs_without_cuda_is_one_error_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        train.main(
            ["--task", "SST2", "--max_steps", "2", "--cuda_graphs", "--output_dir", str(out)]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: CUDA graphs need a CUDA device (--cuda_graphs"
    ), err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra,named",
    [
        (["--trainer", "fo"], "not with --trainer fo.*\\(--cuda_graphs\\)"),
        (["--n_spsa", "2"], "estimator=spsa with n_spsa=2 does not support CUDA graphs"),
        (["--optimizer", "adam"], "optimizer=adam does not support CUDA graphs"),
        (["--perturbation", "reference"], "perturbation=reference does not support CUDA graphs"),
        (["--estimator", "fzoo"], "estimator=fzoo with fzoo_n=8 does not support CUDA graphs"),
        (["--sparse_mezo", "0.5"], "sparse_mezo=0.5 does not support CUDA graphs"),
    ],
)
def test_cuda_graphs_name_what_they_cannot_capture(monkeypatch, extra, named):
    # past the device check, on any machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = flags.parse_args(["--task", "SST2", "--cuda_graphs", "--device", "cuda", *extra])
    with pytest.raises(ValueError, match=named):
        flags.resolve(args, "opt")
    plain = flags.parse_args(["--task", "SST2", "--cuda_graphs", "--device", "cuda"])
    flags.resolve(plain, "opt")  # a plain ZO-SGD run passes
