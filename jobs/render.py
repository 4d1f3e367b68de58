"""Render an avatar through the render API: one PNG, or an interpolation strip along one slider.

    python jobs/render.py ada-1234abcd --attr hair=1.5 --expr smile=0.8 --yaw 20 --pitch -5 --out ada.png
    python jobs/render.py ada-1234abcd --strip hair --steps 5 --size 128 --out hair_strip.png
    python jobs/render.py ada-1234abcd@v0002 --bundle --out ada.bundle

--strip NAME sweeps an attribute slider over [0, number of edits - 1] (or an expression over [0, 1])
in --steps evenly spaced values, the other values fixed by --attr/--expr, and writes the frames side
by side. --bundle writes the avatar's web bundle instead (GET /v1/avatars/{id}/bundle; ID@VERSION
pins a version): the file the viewer decodes in the browser, checked before it is written.

Needs a running server (serve run serve/config.yaml); --url picks it. Exit 0 on success, 2 for
unusable arguments or a request the server refuses (its message is printed), 1 when the server is
unreachable or sends an unusable bundle.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from perse_ray.client import InvalidRequest, RenderClient, RenderError  # noqa: E402


def _pair(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        if name.strip():
            return name.strip(), float(value)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=NUMBER")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="render.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("avatar_id")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="render API base URL; $PERSE_API_KEY, when set, is sent as its Bearer key")
    p.add_argument("--attr", action="append", default=[], type=_pair, metavar="NAME=VALUE",
                   help="attribute slider (repeatable)")
    p.add_argument("--expr", action="append", default=[], type=_pair, metavar="NAME=VALUE",
                   help="expression value (repeatable)")
    p.add_argument("--yaw", type=float, default=0.0, help="degrees, |yaw| <= 90")
    p.add_argument("--pitch", type=float, default=0.0, help="degrees, |pitch| <= 60")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--strip", metavar="NAME", help="attribute or expression to sweep")
    p.add_argument("--steps", type=int, default=5, help="frames in the strip (>= 2)")
    p.add_argument("--bundle", action="store_true", help="write the web bundle (binary) instead of a picture")
    p.add_argument("--out", required=True, help="output .png (or the bundle's file with --bundle)")
    args = p.parse_args(argv)
    if args.bundle and args.strip is not None:
        p.error("--bundle and --strip are exclusive")
    if args.strip is not None and args.steps < 2:
        p.error("--steps must be >= 2")
    return args


def sweep(avatar: dict, name: str, steps: int) -> tuple[str, list[float]]:
    """("attributes" | "expression", values) of a strip along ``name``."""
    if name in avatar["attributes"]:
        top = len(avatar["attributes"][name]) - 1
        return "attributes", [top * i / (steps - 1) for i in range(steps)]
    if name in avatar["expressions"]:
        return "expression", [i / (steps - 1) for i in range(steps)]
    raise InvalidRequest(0, f"--strip {name}: not an attribute or expression of {avatar['id']}; choices: "
                            f"{sorted(avatar['attributes']) + list(avatar['expressions'])}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return write_bundle(args) if args.bundle else write_image(args)
    except InvalidRequest as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except RenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if e.status else 1


def write_image(args: argparse.Namespace) -> int:
    from PIL import Image

    attributes, expression = dict(args.attr), dict(args.expr)
    with RenderClient(args.url) as client:
        view = {"yaw": args.yaw, "pitch": args.pitch, "size": args.size}
        if args.strip is None:
            image = client.render(args.avatar_id, attributes=attributes, expression=expression, **view)
        else:
            avatar = client.manifest(args.avatar_id)
            avatar = {"id": avatar["id"], "expressions": avatar["layout"]["expressions"],
                      "attributes": {a["name"]: a["edit_labels"] for a in avatar["layout"]["attributes"]}}
            part, values = sweep(avatar, args.strip, args.steps)

            def frame(value: float):
                sliders = {"attributes": dict(attributes), "expression": dict(expression)}
                sliders[part][args.strip] = value
                return client.render(args.avatar_id, **sliders, **view)

            with ThreadPoolExecutor(min(len(values), 16)) as pool:  # concurrent: the server batches them
                frames = list(pool.map(frame, values))
            image = Image.new("RGB", (sum(f.width for f in frames), frames[0].height))
            for i, f in enumerate(frames):
                image.paste(f, (i * f.width, 0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({image.width}x{image.height})")
    return 0


def write_bundle(args: argparse.Namespace) -> int:
    from perse_ray.avatar.bundle import BundleError, decode_bundle

    try:
        with RenderClient(args.url) as client:
            data = client.bundle(args.avatar_id)
        bundle = decode_bundle(data)
    except BundleError as e:
        print(f"error: the server sent an unusable bundle: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    who = bundle.header["avatar"]
    print(f"wrote {out} ({len(data)} bytes: {who['id']}@{who['version']}, {bundle.num_gaussians} Gaussians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
