"""Add an edit to a trained avatar without retraining it: a new level of an attribute, or a new attribute.

    python jobs/edit_avatar.py --registry out/demo/avatars --subject astronaut-1a2b3c4d \\
        --attribute hair --from-portrait examples/portraits/grace_hopper.jpg
    python jobs/edit_avatar.py --registry out/demo/avatars --subject astronaut-1a2b3c4d \\
        --attribute hair --params hue=0.6,amount=0.8 --label blue
    python jobs/edit_avatar.py --registry out/demo/avatars --subject astronaut-1a2b3c4d@v0001 \\
        --new-attribute skin --edits 'tan:tone=-0.5,warmth=0.4;pale:tone=0.6'

The subject's aligned portrait (from the build's synthesis output, <registry>/../synth unless
--synth says otherwise) and the shared motion script make the new edit's 2D frames with the same
stages a build runs (edit, animate, morph references, identity filter). Then only the new part is
fitted: for a new level its code and a residual branch on the attribute (the attribute's old
levels are replayed so they stay put), for a new attribute a new branch; both add exactly nothing
at their source code, so every render with that slider at 0 stays bit-identical. The result is the subject's
next registry version; its avatar.json's "edits" records what was added, from what, and its scores.
Serve, the viewer, .ply export and the web bundle read it like any other version.

--from-portrait (classical editor, the cpu presets) measures the attribute in the reference picture:
hair colour in its hair region, beard density and colour, glasses and their rim and tint, skin
tone, and feeds those values to the editor's parameters. It carries colour and strength, not shape
(a hair style, a beard's outline or a frame's design stay the source's). The reference must show a
face. --prompt is for the instruct_pix2pix editor (the gpu preset); the classical editor reads
--params. Needs no Ray: one subject is one process.

exit codes: 0 added, 1 the subject is being edited by another job or the fit failed, 2 unusable
arguments or input (unknown subject or attribute, a reference without a face, a name that clashes,
no edits); nothing is written to the registry unless the exit code is 0.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perse_ray.config import EditSpec  # noqa: E402

LEVEL_LABEL = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def parse_params(text: str) -> dict[str, float]:
    """'hue=0.6,amount=0.8' -> {'hue': 0.6, 'amount': 0.8}."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"params: {item!r} is not KEY=NUMBER") from None
        if not sep or not key.strip():
            raise ValueError(f"params: {item!r} is not KEY=NUMBER")
    if not out:
        raise ValueError("params: none given (KEY=NUMBER,...)")
    return out


def parse_edits(text: str, classical: bool) -> list[EditSpec]:
    """'tan:tone=-0.5,warmth=0.4;pale:tone=0.6' (classical) or 'tan:give the skin a tan' (a prompt)."""
    specs = []
    for item in filter(None, (p.strip() for p in text.split(";"))):
        label, sep, body = item.partition(":")
        if not sep or not body.strip():
            raise ValueError(f"edits: {item!r} is not LABEL:PARAMS (or LABEL:PROMPT for a diffusion editor)")
        specs.append(EditSpec(check_label(label.strip()), **({"params": parse_params(body)} if classical
                                                              else {"prompt": body.strip()})))
    if not specs:
        raise ValueError("--new-attribute needs --edits with at least one LABEL:PARAMS")
    return specs


def check_label(label: str) -> str:
    if not LEVEL_LABEL.match(label) or label == "source":
        raise ValueError(f"label {label!r}: use 1-32 of a-z, 0-9, '-', '_' (not 'source')")
    return label


def parse_args(argv):
    p = argparse.ArgumentParser(prog="edit_avatar.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", required=True, help="the registry folder (a build's <output>/avatars)")
    p.add_argument("--synth", default=None,
                   help="the build's synthesis output, for the subject's aligned portrait (default <registry>/../synth)")
    p.add_argument("--subject", required=True, metavar="ID[@VERSION]",
                   help="the subject, and the version to extend (default: its newest)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--attribute", help="add one level to this existing attribute")
    mode.add_argument("--new-attribute", metavar="NAME", help="add a whole new attribute (needs --edits)")
    p.add_argument("--from-portrait", metavar="IMAGE", help="take the level from this person's picture (classical editor)")
    p.add_argument("--params", help="the level's editor params, KEY=NUMBER,... (classical editor)")
    p.add_argument("--prompt", help="the level's text instruction (instruct_pix2pix editor)")
    p.add_argument("--label", help="the new level's name (default: derived from the reference or 'level-K')")
    p.add_argument("--edits", help="--new-attribute's levels: 'LABEL:KEY=NUMBER,...;LABEL:...' (or LABEL:PROMPT)")
    p.add_argument("--steps", type=int, default=None, help="fit steps (default: a fifth of the avatar's training steps)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="where to fit (default: the avatar's machine.device)")
    p.add_argument("--lease-timeout", type=float, default=0.0, metavar="S",
                   help="seconds to wait if another edit of this subject runs (default 0: fail at once)")
    p.add_argument("--no-progress", action="store_true", help="no per-step progress lines")
    return p.parse_args(argv)


def read_subject_row(synth: Path, subject_id: str) -> dict:
    """The subject's ``subjects`` row, from its frames partition (one small file)."""
    import pyarrow.parquet as pq

    from perse_ray.schema import rows_from_table
    from perse_ray.synth.write import SUBJECT_FILE

    path = synth / "frames" / f"subject_id={subject_id}" / SUBJECT_FILE
    if not path.is_file():
        raise ValueError(f"no synthesized portrait of {subject_id} in {synth} (looked for {path}); "
                         "pass the build's synthesis output with --synth")
    return rows_from_table(pq.read_table(path))[0]


def make_extension(args, avatar, subject: dict):
    """The Extension the arguments ask for; ValueError naming what is wrong."""
    import numpy as np

    from perse_ray.portraits import decode_png
    from perse_ray.train.extend import Extension, attribute_specs, avatar_config

    cfg = avatar_config(avatar)
    classical = cfg.synth.edit_backend == "classical"
    if args.new_attribute:
        if args.from_portrait or args.params or args.prompt or args.label:
            raise ValueError("--new-attribute takes its levels from --edits only")
        if not args.edits:
            raise ValueError("--new-attribute needs --edits 'LABEL:KEY=NUMBER,...;...'")
        name = args.new_attribute
        if not LEVEL_LABEL.match(name):
            raise ValueError(f"attribute name {name!r}: use 1-32 of a-z, 0-9, '-', '_'")
        if classical:
            from perse_ray.synth.classical.edits import EDITS
            if name not in EDITS:
                raise ValueError(f"the classical editor has no edit {name!r}; choices: {', '.join(sorted(EDITS))}")
        return Extension("attribute", name, tuple(parse_edits(args.edits, classical)), {"edits": args.edits})
    if args.edits:
        raise ValueError("--edits goes with --new-attribute; a new level takes --params, --prompt or --from-portrait")
    sources = [x for x in (args.from_portrait, args.params, args.prompt) if x]
    if len(sources) != 1:
        raise ValueError("a new level takes exactly one of --from-portrait, --params, --prompt")
    level = len(attribute_specs(avatar).get(args.attribute, [])) + 1
    if args.prompt:
        if classical:
            raise ValueError("the classical editor reads --params, not a prompt (--prompt is for instruct_pix2pix)")
        spec, origin = EditSpec(check_label(args.label or f"level-{level}"), prompt=args.prompt), {"prompt": args.prompt}
    elif args.params:
        if not classical:
            raise ValueError(f"the {cfg.synth.edit_backend} editor reads --prompt, not --params")
        spec = EditSpec(check_label(args.label or f"level-{level}"), params=parse_params(args.params))
        origin = {"params": spec.params}
    else:
        if not classical:
            raise ValueError(f"--from-portrait measures the reference for the classical editor; the "
                             f"{cfg.synth.edit_backend} editor takes a text (--prompt)")
        reference = reference_row(Path(args.from_portrait), cfg)
        from perse_ray.synth.classical.measure import transfer_params

        params = transfer_params(args.attribute, decode_png(subject["portrait_png"]),
                                 np.asarray(subject["landmarks"], np.float32), decode_png(reference["portrait_png"]),
                                 np.asarray(reference["landmarks"], np.float32))
        label = args.label or check_label(re.sub(r"[^a-z0-9_-]+", "-", Path(args.from_portrait).stem.lower())[:32]
                                          .strip("-") or f"level-{level}")
        spec = EditSpec(check_label(label), params=params)
        origin = {"portrait": Path(args.from_portrait).name, "content_sha256": reference["content_sha256"],
                  "measured_params": params}
    return Extension("level", args.attribute, (spec,), origin)


def reference_row(path: Path, cfg) -> dict:
    """The reference picture ingested as a build ingests a portrait; ValueError without a usable face."""
    from perse_ray.faces import load_face_model
    from perse_ray.portraits import candidate_for_file
    from perse_ray.synth.ingest import ingest_subject

    row = ingest_subject(candidate_for_file(path), load_face_model(cfg.faces), cfg)  # InputError is a ValueError
    if row["status"] != "ok":
        raise ValueError(f"reference {path.name} cannot be used: {row['reason']}")
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from perse_ray.avatar.io import AvatarFormatError
    from perse_ray.lease import Lease, LeaseHeld
    from perse_ray.registry import Registry, RegistryError
    from perse_ray.train.extend import extend_avatar

    registry_root = Path(args.registry).expanduser()
    synth = Path(args.synth).expanduser() if args.synth else registry_root.resolve().parent / "synth"
    subject_id, _, version = args.subject.partition("@")
    try:
        if not registry_root.is_dir():
            raise ValueError(f"registry {registry_root} is not a folder")
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        registry = Registry(registry_root)
        entry = registry.get(subject_id, version or None)
    except (ValueError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # A short expiry: a killed edit blocks the next one for seconds, not a minute.
    lease = Lease(registry.root / subject_id / ".edit.lease", owner=f"edit_avatar pid {os.getpid()}", ttl_s=10)
    try:
        lease.acquire(timeout_s=args.lease_timeout, poll_s=0.5)
    except LeaseHeld as e:
        print(f"error: another edit of {subject_id} is running ({e}); nothing was written", file=sys.stderr)
        return 1
    with lease:
        try:
            entry = registry.get(subject_id, version or None)  # the newest once the lease is ours
            avatar = registry.load(subject_id, entry.version)
            subject = read_subject_row(synth, subject_id)
            extension = make_extension(args, avatar, subject)
            if args.device:
                avatar.meta["config"].setdefault("machine", {})["device"] = args.device
            print(f"{subject_id}@{entry.version}: adding {extension.kind} {extension.attribute!r} "
                  f"({', '.join(e.label for e in extension.edits)})", flush=True)
            grown = extend_avatar(avatar, subject, extension, steps=args.steps, base_version=entry.version,
                                  progress=not args.no_progress, log=lambda line: print(line, flush=True))
            lease.check()  # a holder that lost its lease stops before writing
            new = registry.put(subject_id, grown)
        except (ValueError, KeyError, RegistryError, AvatarFormatError) as e:
            print(f"error: {e}; nothing was written", file=sys.stderr)
            return 2
        except RuntimeError as e:  # a failed fit, a lost lease
            print(f"error: {e}; nothing was written", file=sys.stderr)
            return 1
    print(f"registered {subject_id}@{new.version} (from {entry.version}): {new.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
