"""Every option name of TRL's trainers, with its type, default and owning class, so prefer can check
that its config keys carry TRL's / transformers' names and defaults (and tell "TRL key prefer does not
implement" apart from "typo").

Run by hand: python tools/make_trl_keys.py [--with-help] [--output PATH]
(trl 1.16.0, transformers 5.23.0, peft 0.21.2; other versions are refused unless --any-version).
Writes tests/fixtures/trl_keys.json:

{
  "versions": {"trl": ..., "transformers": ..., "peft": ..., "torch": ...},
  "classes": {
    "DPOConfig": [
      {"name": "learning_rate", "type": "float", "default": 1e-06, "owner": "DPOConfig",
       "source": "trl/trainer/dpo_config.py:156", "declared_in": ["TrainingArguments", "DPOConfig"],
       "overrides": {"TrainingArguments": 5e-05}, "init": true, "choices": null},
      ...],                                          # dataclass field order (TrainingArguments first)
    "ModelConfig": [...], "ScriptArguments": [...], "DatasetMixtureConfig": [...],
    "KTOConfig": [...], "CPOConfig": [...], "ORPOConfig": [...], "TrainingArguments": [...]
  },
  "trl_dpo_cli": ["dataset_name", ...],              # every key `trl dpo --config x.yaml` accepts
  "enums": {"lr_scheduler_type": [...], "optim": [...], "eval_strategy": [...], ...},
  "effective": {"DPOConfig": {...}}                  # DPOConfig(...).to_dict() after __post_init__
}

`default` is the declared default (a `default_factory` is called), as JSON; enums become their
value; a default JSON cannot hold is null with its Python repr in `default_repr`. `owner` is the
most-derived class that declares the field; `declared_in` lists every class in the MRO that declares
it (base first) and `overrides` the defaults it had in the earlier ones. `effective` depends on the
machine (the `optim` default is `adamw_torch_fused` with torch >= 2.8; `bf16=None` resolves to True,
which fails on a machine without bf16, so it is built with the arguments in `effective_args`).
"""

import argparse
import dataclasses
import enum
import inspect
import json
import os
import re
import sys
import typing
import warnings

PINNED = {"trl": "1.16.0", "transformers": "5.23.0", "peft": "0.21.2"}
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "trl_keys.json")


def type_string(t) -> str:
    """The annotation as source-like text: `int | None`, `list[str]`, `dict[str, Any] | str | None`."""
    if isinstance(t, str):
        return t
    if isinstance(t, type) and not typing.get_args(t):
        return t.__name__
    s = str(t)
    for prefix in ("typing.", "transformers.training_args.", "transformers.trainer_utils.",
                   "transformers.debug_utils.", "trl.scripts.utils."):
        s = s.replace(prefix, "")
    return s.replace("<class '", "").replace("'>", "")


def to_json(value):
    """(JSON value, repr or None when the JSON value is exact)."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        value = [v.value if isinstance(v, enum.Enum) else v for v in value]
    try:
        json.dumps(value, allow_nan=False)
        return value, None
    except (TypeError, ValueError):
        return None, repr(value)


def declared_default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def source_of(cls, name: str):
    """`package/file.py:LINE` of the field's declaration in `cls`, or None."""
    try:
        lines, start = inspect.getsourcelines(cls)
        path = inspect.getsourcefile(cls)
    except (OSError, TypeError):
        return None
    pattern = re.compile(rf"^    {re.escape(name)}\s*:")  # class-body indent, not the docstring
    for i, line in enumerate(lines):
        if pattern.match(line):
            parts = path.replace(os.sep, "/").split("/site-packages/")
            return f"{parts[-1]}:{start + i}"
    return None


def fields_of(cls, with_help: bool):
    mro = [c for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c)]
    by_name = {c.__name__: c for c in mro}
    rows = []
    for f in dataclasses.fields(cls):
        declared_in = [c.__name__ for c in mro if f.name in c.__dict__.get("__annotations__", {})]
        default = declared_default(f)
        row = {"name": f.name, "type": type_string(f.type)}
        if default is dataclasses.MISSING:
            row["default"], row["required"] = None, True
        else:
            row["default"], rep = to_json(default)
            if rep is not None:
                row["default_repr"] = rep
        row["owner"] = declared_in[-1] if declared_in else cls.__name__
        row["source"] = source_of(by_name.get(row["owner"], cls), f.name)
        row["declared_in"] = declared_in
        overrides = {}
        for c in mro:
            if c.__name__ in declared_in[:-1]:
                base_field = {g.name: g for g in dataclasses.fields(c)}.get(f.name)
                if base_field is not None:
                    base_default = declared_default(base_field)
                    if base_default is not dataclasses.MISSING:
                        overrides[c.__name__] = to_json(base_default)[0]
        if overrides:
            row["overrides"] = overrides
        row["init"] = f.init
        choices = f.metadata.get("choices")
        row["choices"] = None if choices is None else [to_json(c)[0] for c in choices]
        if with_help:
            row["help"] = f.metadata.get("help")
        rows.append(row)
    return rows


def dumps(out) -> str:
    """JSON with one line per field row (readable diffs when a version bump changes a default)."""
    parts = []
    for key, value in out.items():
        if key == "classes":
            blocks = []
            for cls, rows in value.items():
                lines = ",\n".join("   " + json.dumps(r) for r in rows)
                blocks.append(f"  {json.dumps(cls)}: [\n{lines}\n  ]")
            parts.append(' "classes": {\n' + ",\n".join(blocks) + "\n }")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=DEFAULT_OUT)
    ap.add_argument("--with-help", action="store_true", help="also store each field's help text")
    ap.add_argument("--any-version", action="store_true", help="do not insist on the pinned versions")
    args = ap.parse_args()

    warnings.simplefilter("ignore")
    import peft
    import torch
    import transformers
    import trl
    from transformers import TrainingArguments
    from transformers.trainer_utils import HubStrategy, IntervalStrategy, SaveStrategy, SchedulerType
    from transformers.training_args import OptimizerNames
    from trl import DPOConfig, KTOConfig, ModelConfig, ScriptArguments
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig
    from trl.scripts.utils import DatasetMixtureConfig

    versions = {"trl": trl.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "torch": torch.__version__}
    wrong = {k: v for k, v in PINNED.items() if versions[k] != v}
    if wrong and not args.any_version:
        sys.exit(f"expected {PINNED}, found {versions} (pass --any-version to dump anyway)")

    classes = {c.__name__: fields_of(c, args.with_help)
               for c in (DPOConfig, ModelConfig, ScriptArguments, DatasetMixtureConfig,
                         KTOConfig, CPOConfig, ORPOConfig, TrainingArguments)}

    # `trl dpo` parses these four dataclasses together (trl/scripts/dpo.py, make_parser)
    cli = []
    for name in ("ScriptArguments", "DPOConfig", "ModelConfig", "DatasetMixtureConfig"):
        cli += [r["name"] for r in classes[name] if r["init"] and r["name"] not in cli]

    enums = {
        "lr_scheduler_type": [e.value for e in SchedulerType],
        "optim": [e.value for e in OptimizerNames],
        "eval_strategy": [e.value for e in IntervalStrategy],
        "logging_strategy": [e.value for e in IntervalStrategy],
        "save_strategy": [e.value for e in SaveStrategy],
        "hub_strategy": [e.value for e in HubStrategy],
    }

    effective_args = {"output_dir": "trainer_output", "bf16": False, "report_to": "none"}
    effective = json.loads(DPOConfig(**effective_args).to_json_string())

    out = {"versions": versions, "classes": classes, "trl_dpo_cli": cli, "enums": enums,
           "effective_args": effective_args, "effective": {"DPOConfig": effective}}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    text = dumps(out)  # serialise fully before touching the file
    with open(args.output, "w") as fh:
        fh.write(text)
    counts = ", ".join(f"{k} {len(v)}" for k, v in classes.items())
    print(f"wrote {os.path.normpath(args.output)}: {counts}; trl dpo accepts {len(cli)} keys")


if __name__ == "__main__":
    main()
