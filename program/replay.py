"""`train.py --replay RUN_DIR`: a MeZO run's selected model, rebuilt from the base model and the
run's trajectory (its seeds and projected grads), bitwise, without a forward pass.

The model is built by the run's own Run (program/run.py: PEFT, sharding) and saved by it, so the
rebuilt model is saved exactly as the run saved its own.
"""

import argparse
import os
import sys

from zo import replay as replay_updates

from . import flags
from .config import as_recorded, check_saved
from .folder_lock import hold
from .json_files import read_json, write_json
from .run import Run
from .run_folder import check_run_folder, prepare_run_folder, run_kind
from .trajectory import records_up_to

# what --replay reads from its command line; the run's config.json gives everything else
REPLAY_FLAGS = frozenset(
    {"replay", "output_dir", "overwrite_output_dir", "device", "fsdp", "dist_timeout"}
)


def check_flags(argv) -> None:
    """A flag that --replay would ignore (the run's own configuration decides) is refused."""
    ignored = sorted(set(flags.given_flags(argv)) - REPLAY_FLAGS)
    if ignored:
        spelling = {a.dest: a.option_strings[0] for a in flags.build_parser()._actions}
        raise ValueError(
            f"{spelling[ignored[0]]} does nothing with --replay: the replayed run's config.json "
            "sets the run (command line)"
        )


def replay(args, dist):
    """RUN_DIR/trajectory.jsonl up to the selected step, applied to the base model, into
    --output_dir (default RUN_DIR-replay); everything is checked before anything is written."""
    src = args.replay
    config, results = (read_json(os.path.join(src, f)) for f in ("config.json", "results.json"))
    if run_kind(src) != "train" or config.get("trainer") != "zo":
        raise ValueError(f"only ZO runs have a trajectory to replay ({src}/config.json)")
    check_saved(config, f"{src}/config.json")
    config = as_recorded(config)
    unresolved = [k for k in ("family", *flags.RESOLVED) if config.get(k) is None]
    if unresolved:  # train.py records them resolved; the replay resolves nothing
        raise ValueError(f"config.json without {unresolved[0]} ({src}/config.json)")
    out = check_run_folder(
        args.output_dir or os.path.normpath(src) + "-replay",
        resume=False,
        overwrite=args.overwrite_output_dir,
        protected=[
            ("replayed run", src),
            ("model", config.get("model")),
            ("data", config.get("data_dir")),
        ],
    )
    # --fsdp as given now: the update is elementwise at global indices, so one process replays a
    # sharded run bitwise, and a sharded replay a single-process run
    run_args = argparse.Namespace(
        **{
            **vars(flags.build_parser().parse_args([])),
            **config,
            "output_dir": out,
            "device": args.device,
            "resume": False,
            "fsdp": args.fsdp,
        }
    )
    lock = hold(out, dist)
    try:
        run = Run(run_args, dist)
        if config.get("base_fingerprint", run.fingerprint) != run.fingerprint:
            raise ValueError(
                f"the trajectory was recorded on other base weights (fingerprint "
                f"{config['base_fingerprint']}, this model's {run.fingerprint}) ({src}/config.json)"
            )
        # every step up to the selected one, each once, checked before anything is written
        records = records_up_to(
            os.path.join(src, "trajectory.jsonl"), results["best_step"], flags.mezo_config(run.args)
        )
    except BaseException:
        lock.abandon()
        raise
    try:
        replay_updates(
            run.model,
            records,
            flags.mezo_config(run.args),
            **{k: v for k, v in run.mezo_kwargs().items() if k == "local_view"},
        )
        if dist.is_main:
            prepare_run_folder(out, resume=False)
            os.makedirs(out, exist_ok=True)
        run.save_model(os.path.join(run.out, "model"))
        if dist.is_main:
            write_json(
                os.path.join(run.out, "config.json"),
                {**vars(run.args), "kind": "replay", "replayed_from": src},
            )
            print(f"replayed {len(records)} updates of {src} into {run.out}/model", file=sys.stderr)
    finally:
        lock.release()
    return 0
