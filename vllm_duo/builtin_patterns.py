"""Head patterns shipped inside the package, and picking one for a served model.

Pure data. The four reference patterns come from DuoAttention (MIT licence, notice in
``pattern_data/LICENSE.duo-attention``); SmolLM2's was identified with ``vllm-duo identify``.
A pattern is picked for a model only when the model's name AND shape (layers, KV heads)
match, so a model that merely shares an attention layout never gets another model's heads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources

from vllm_duo.errors import DuoConfigError

DATA_DIR = str(resources.files("vllm_duo") / "pattern_data")
DUO_SOURCE = "DuoAttention reference patterns (github.com/mit-han-lab/duo-attention, MIT)"
LICENSE_FILE = os.path.join(DATA_DIR, "LICENSE.duo-attention")


@dataclass(frozen=True)
class BuiltinPattern:
    name: str  # folder under pattern_data/, and the value users pass as "pattern"
    models: tuple[str, ...]  # Hugging Face ids it was made for
    source: str

    @property
    def path(self) -> str:
        return os.path.join(DATA_DIR, self.name)

    def shape(self) -> tuple[int, int]:
        """(layers, KV heads), read from the packaged TSV."""
        from vllm_duo.patterns import load_gates

        return load_gates(self.path).shape


BUILTINS: tuple[BuiltinPattern, ...] = (
    BuiltinPattern("Llama-2-7B-32K-Instruct", ("togethercomputer/Llama-2-7B-32K-Instruct",), DUO_SOURCE),
    BuiltinPattern("Llama-3-8B-Instruct-Gradient-1048k", ("gradientai/Llama-3-8B-Instruct-Gradient-1048k",),
                   DUO_SOURCE),
    BuiltinPattern("Meta-Llama-3.1-8B-Instruct",
                   ("meta-llama/Meta-Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"), DUO_SOURCE),
    BuiltinPattern("Mistral-7B-Instruct-v0.2", ("mistralai/Mistral-7B-Instruct-v0.2",), DUO_SOURCE),
    BuiltinPattern("smollm2-135m-instruct", ("HuggingFaceTB/SmolLM2-135M-Instruct",),
                   "vllm-duo identify, 1600 steps (docs/provenance/smollm2-135m-instruct)"),
)
_BY_NAME = {p.name: p for p in BUILTINS}


def builtin_names() -> list[str]:
    return [p.name for p in BUILTINS]


def builtin(name: str) -> BuiltinPattern | None:
    """The built-in pattern called ``name`` (exact name), else None."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


def model_key(name_or_path: str) -> str:
    """A model's comparable name: the last part of a path or HF id, lower case.

    A Hugging Face cache path (``.../models--org--name/snapshots/<hash>``) gives ``name``.
    """
    text = str(name_or_path).rstrip("/\\")
    cached = re.search(r"models--[^/\\]+--([^/\\]+)", text)
    return (cached.group(1) if cached else os.path.basename(text) or text).lower()


def _keys(p: BuiltinPattern) -> set[str]:
    return {model_key(p.name)} | {model_key(m) for m in p.models}


ENGINE_HINT = "pass --additional-config '{\"duo_attention\": {\"pattern\": NAME_OR_FOLDER}}'"


def pick_builtin(model_names: list[str], num_layers: int, num_kv_heads: int,
                 how_to_pass: str = ENGINE_HINT) -> BuiltinPattern:
    """The built-in pattern for a model known by ``model_names`` with this shape.

    Raises with the built-in names and how to make a pattern when none matches.
    """
    keys = {model_key(n) for n in model_names if n}
    named = [p for p in BUILTINS if _keys(p) & keys]
    for p in named:
        if p.shape() == (num_layers, num_kv_heads):
            return p
    shown = ", ".join(sorted(keys)) or "the model"
    why = (f"built-in {named[0].name} has shape {named[0].shape()} but {shown} has "
           f"({num_layers}, {num_kv_heads}) (layers x KV heads)") if named else \
        f"no built-in pattern is made for {shown}"
    raise DuoConfigError(
        f"duo needs a head pattern and {why}; built-in patterns: {', '.join(builtin_names())} "
        f"(`vllm-duo patterns`). {how_to_pass[0].upper()}{how_to_pass[1:]}, or make a pattern with "
        f"`vllm-duo identify MODEL_FOLDER --out DIR`")
