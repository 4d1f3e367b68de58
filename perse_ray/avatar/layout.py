"""The latent layout, as data: z = [z_exp, z_attr_1 … z_attr_A].

z_exp holds the named expression values of the motion script (known, not learned). Each attribute
owns a learned code per edit (edit 0 = the unedited source, fixed at zero); a slider value
s ∈ [0, K−1] is the linear interpolation of the two adjacent edit codes, so sliders are continuous
by construction and the interpolation loss can supervise the in-between values.

The decoder has one branch per part of z (``LatentLayout.branches``). Parts added to an avatar
after training (``perse_ray.avatar.extend``) get *anchored* branches, which add exactly nothing
at the source code: such a branch outputs f(z) − f(0), and exactly zero where its slice of z is
all zeros. A new attribute is ``anchored`` (every render with its slider at 0 is bit-identical to
the avatar without it); a new level of an attribute adds one ``residual`` anchored branch on that
attribute's slice (every render with that slider at 0 stays bit-identical).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

MAX_RESIDUALS = 64  # residual branches per attribute (new levels added after training); readers cap on it


@dataclass(frozen=True)
class AttributeLayout:
    name: str
    edit_labels: list[str]  # edit_labels[0] is the source ("source")
    code_dim: int
    anchored: bool = False  # its branch adds exactly nothing at the source code (see the module doc)
    residuals: int = 0  # anchored branches added on its slice of z after training (new levels)

    @property
    def num_edits(self) -> int:
        return len(self.edit_labels)


@dataclass(frozen=True)
class Branch:
    """One decoder branch: the part of z it sees ("expression" or an attribute's name) and whether
    it is anchored (outputs f(z) − f(0), exactly zero at the source code)."""

    input: str
    anchored: bool


@dataclass(frozen=True)
class LatentLayout:
    expressions: list[str]
    attributes: list[AttributeLayout] = field(default_factory=list)

    def __post_init__(self):
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names) or len(set(self.expressions)) != len(self.expressions):
            raise ValueError(f"duplicate attribute or expression names: {names}, {self.expressions}")
        for a in self.attributes:
            if a.num_edits < 2 or a.code_dim < 1 or not 0 <= a.residuals <= MAX_RESIDUALS:
                raise ValueError(f"attribute {a.name!r} needs >= 2 edits (source + 1), code_dim >= 1 "
                                 f"and residuals in 0..{MAX_RESIDUALS}")

    @classmethod
    def from_config(cls, synth_cfg, code_dim: int, anchored: bool = False) -> "LatentLayout":
        """``anchored``: every attribute's branch adds exactly nothing at its source level."""
        return cls(
            expressions=list(synth_cfg.motion.expressions),
            attributes=[AttributeLayout(a.name, ["source"] + [e.label for e in a.edits], code_dim, anchored)
                        for a in synth_cfg.attributes],
        )

    @property
    def exp_dim(self) -> int:
        return len(self.expressions)

    @property
    def dim(self) -> int:
        return self.exp_dim + sum(a.code_dim for a in self.attributes)

    def branches(self) -> list[Branch]:
        """The decoder's branches in order: the expression, each attribute, then every attribute's
        residual branches (the order the browser's decoder follows too)."""
        out = [Branch("expression", False)] + [Branch(a.name, a.anchored) for a in self.attributes]
        return out + [Branch(a.name, True) for a in self.attributes for _ in range(a.residuals)]

    def branch_dims(self) -> list[int]:
        dims = {a.name: a.code_dim for a in self.attributes}
        return [max(self.exp_dim, 1) if b.input == "expression" else dims[b.input] for b in self.branches()]

    def slices(self) -> dict[str, slice]:
        """Where each part lives in z: ``"expression"`` and one entry per attribute name."""
        out = {"expression": slice(0, self.exp_dim)}
        start = self.exp_dim
        for a in self.attributes:
            out[a.name] = slice(start, start + a.code_dim)
            start += a.code_dim
        return out

    def attribute(self, name: str) -> AttributeLayout:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(f"unknown attribute {name!r}; choices: {[a.name for a in self.attributes]}")

    def check_values(self, attributes: dict[str, float], expression: dict[str, float]) -> None:
        """Raise ``ValueError`` naming the field for unknown names or out-of-range values."""
        by_name = {a.name: a for a in self.attributes}
        for name, s in attributes.items():
            if name not in by_name:
                raise ValueError(f"attributes.{name}: unknown attribute; choices: {list(by_name)}")
            if not (0.0 <= float(s) <= by_name[name].num_edits - 1):
                raise ValueError(f"attributes.{name}: slider {s} outside [0, {by_name[name].num_edits - 1}]")
        for name, v in expression.items():
            if name not in self.expressions:
                raise ValueError(f"expression.{name}: unknown expression; choices: {self.expressions}")
            if not (-1.0 <= float(v) <= 2.0):
                raise ValueError(f"expression.{name}: value {v} outside [-1, 2]")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "LatentLayout":
        return cls(expressions=[str(e) for e in data["expressions"]],
                   attributes=[AttributeLayout(str(a["name"]), [str(x) for x in a["edit_labels"]],
                                               int(a["code_dim"]), bool(a.get("anchored", False)),
                                               int(a.get("residuals", 0)))
                               for a in data["attributes"]])

    @classmethod
    def from_json(cls, text: str) -> "LatentLayout":
        return cls.from_dict(json.loads(text))
