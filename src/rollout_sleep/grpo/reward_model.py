"""A reward model as a reward: a local sequence-classification checkpoint, scored in batches.

It follows TRL's GRPOTrainer: the model is ``AutoModelForSequenceClassification`` with one label, its own
tokenizer (``pad_token`` falls back to ``eos_token``); conversational prompt + completion are rendered with
that tokenizer's chat template (``messages = prompt + completion``), plain ones are concatenated; inputs
are right-padded without special tokens and the reward is ``logits[:, 0]``.

Where it runs (the recipe): its weights stay on the trainer's device for the whole run; it scores inside
the training phase, after the engine went to sleep and before the policy update. There vLLM's KV cache
(and at level 2 its weights) are released and the trainer's activations are not yet allocated, so the
scoring forward's activations fit in memory the update is about to use anyway: the step's peak is the
update's, plus the reward model's weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import RewardError

logger = logging.getLogger(__name__)


def _saved_labels(path: Path) -> int | None:
    """How many labels the checkpoint's config.json declares (``id2label`` or ``num_labels``), if it says."""
    import json

    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return len(raw["id2label"]) if isinstance(raw.get("id2label"), dict) else raw.get("num_labels")


class RewardModel:
    """TRL's reward-function signature: ``model(prompts, completions, **kwargs) -> list[float]``.

    Args:
        path: a local checkpoint directory whose config names a sequence-classification architecture.
        device: *optional*, where to load it (``load()`` can move it later).
        dtype: *optional*, the weights' dtype (default: the checkpoint's).
        batch_size: *optional*, completions per forward pass.
        load: *optional*, ``False`` checks the checkpoint's config only; call :meth:`load` before scoring.
    """

    def __init__(self, path: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 batch_size: int = 32, load: bool = True):
        from transformers import AutoConfig

        self.path = str(path)
        self.name = Path(path).resolve().name  # TRL names a reward model by its id's last part
        self.batch_size = batch_size
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        try:
            config = AutoConfig.from_pretrained(self.path)
        except Exception as err:
            raise RewardError(f"reward model {self.path!r}: not a loadable checkpoint ({err})") from err
        archs = config.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            what = archs or "checkpoint without architectures"
            raise RewardError(f"reward model {self.path!r} is a {what}; a reward "
                              f"model is a sequence-classification checkpoint (one label), e.g. "
                              f"XForSequenceClassification saved with save_pretrained")
        labels = _saved_labels(Path(self.path))  # transformers' default (2) when the file names none does not count
        if labels not in (None, 1):  # TRL loads it with num_labels=1 too, which then fails
            raise RewardError(f"reward model {self.path!r} has {labels} labels; a reward model has one "
                              f"(its score head's single logit is the reward): loading it with num_labels=1, as TRL "
                              f"does, fails on the head's size")
        self._check_weights()
        self.model = None
        self.tokenizer = None
        if load:
            self.load(device)

    def _check_weights(self) -> None:
        """Before anything loads: the checkpoint files hold every weight the model has, its score head
        included, each of the model's shape, and the folder has a tokenizer. Read on the meta device (names and
        shapes only, no data), as the real load will read them."""
        from transformers import AutoModelForSequenceClassification

        try:
            _, info = AutoModelForSequenceClassification.from_pretrained(
                self.path, num_labels=1, device_map="meta", output_loading_info=True, ignore_mismatched_sizes=True)
        except NotImplementedError as err:  # a model class that cannot be built on the meta device
            logger.debug("reward model %s: weights not checked before loading (%s)", self.path, err)
        except Exception as err:  # no weight files, or ones safetensors / torch cannot read (truncated, foreign)
            raise RewardError(f"reward model {self.path!r}: its weights cannot be read: {type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else ''} (a folder saved with "
                              f"save_pretrained holds model.safetensors, pytorch_model.bin or a sharded index of "
                              f"them, complete)") from err
        else:
            self._refuse_missing(info)
        self._checked_tokenizer = self._tokenizer()
        self._check_tokenizer(self._checked_tokenizer)

    def check_prompts(self, conversational: bool) -> None:
        """Raise when the model cannot read the run's prompts: conversational ones are rendered with its own chat
        template (TRL's rule, :meth:`texts`), which its tokenizer must then have."""
        tokenizer = self.tokenizer or getattr(self, "_checked_tokenizer", None)
        if conversational and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise RewardError(f"reward model {self.path!r}: the prompts are conversations, which a reward model reads "
                              f"through its own chat template (prompt and completion rendered together, as TRL does), "
                              f"but its tokenizer has none: save the tokenizer with the chat template the reward "
                              f"model was trained with into the folder (tokenizer.save_pretrained(folder)), or give "
                              f"plain-text prompts")

    def _refuse_missing(self, info: dict) -> None:
        """Raise when transformers' loading report lists weights the checkpoint lacks, or has in another shape:
        they would be drawn at random at every load (a score head that means nothing), which transformers only
        logs, or the load fails."""
        mismatched = list(info.get("mismatched_keys") or ())
        if mismatched:
            key, saved, wanted = mismatched[0][:3] if isinstance(mismatched[0], (tuple, list)) else \
                (mismatched[0], "?", "?")
            raise RewardError(f"reward model {self.path!r}: its checkpoint's {key} has shape {list(saved)}, the "
                              f"model's is {list(wanted)}" + (f" ({len(mismatched) - 1} more differ)" if
                                                              len(mismatched) > 1 else "") +
                              ": a reward model has one label (its score head's single logit is the reward), and "
                              "config.json must describe the saved weights. Give the folder of a one-label "
                              "sequence-classification model, saved with save_pretrained")
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise RewardError(f"reward model {self.path!r}: its checkpoint files have no weights for {shown}; loading "
                              f"it would draw them at random (other scores at every load, none of them trained). "
                              f"Give the folder of a trained reward model, saved with save_pretrained from its "
                              f"sequence-classification model (a base model's folder whose config names a "
                              f"...ForSequenceClassification architecture has no score head)")

    def _tokenizer(self):
        """The folder's tokenizer, ``pad_token`` falling back to ``eos_token`` (TRL's rule)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path)
        except Exception as err:
            raise RewardError(f"reward model {self.path!r}: its tokenizer cannot be loaded: {type(err).__name__}: "
                              f"{err}. Save it into the folder: tokenizer.save_pretrained(folder)") from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _check_tokenizer(self, tokenizer) -> None:
        """A tokenizer that turns text into tokens and can pad a batch. Without tokenizer files transformers
        builds an empty one from the config (every text becomes no tokens), which fails at the first scoring."""
        if not tokenizer(text="The answer is 42.", add_special_tokens=False).input_ids:
            raise RewardError(f"reward model {self.path!r}: its tokenizer turns text into no tokens: the folder has "
                              f"no tokenizer files (tokenizer.json, or vocab and merges files), and transformers "
                              f"built an empty tokenizer from the config. Save the tokenizer the reward model was "
                              f"trained with into the folder: tokenizer.save_pretrained(folder)")
        if tokenizer.pad_token is None:
            raise RewardError(f"reward model {self.path!r}: its tokenizer has neither a pad_token nor an eos_token, "
                              f"so a batch of texts cannot be padded: set tokenizer.pad_token and save it into the "
                              f"folder (tokenizer.save_pretrained(folder))")

    def load(self, device: str | torch.device = "cpu") -> "RewardModel":
        """Load weights and tokenizer onto ``device`` (once), in eval mode without gradients."""
        from transformers import AutoModelForSequenceClassification

        if self.model is None:
            self.tokenizer = self._tokenizer()
            self._check_tokenizer(self.tokenizer)
            kw = {"dtype": self.dtype} if self.dtype is not None else {}
            model, info = AutoModelForSequenceClassification.from_pretrained(
                self.path, num_labels=1, output_loading_info=True, ignore_mismatched_sizes=True, **kw)
            self._refuse_missing(info)
            self.model = model
            if self.model.config.pad_token_id is None:
                self.model.config.pad_token_id = self.tokenizer.pad_token_id
            self.model.eval().requires_grad_(False)
        self.model.to(device)
        return self

    def texts(self, prompts: list, completions: list) -> list[str]:
        """What the model reads: the chat template over prompt + completion, or the two texts joined."""
        if prompts and isinstance(prompts[0], list):
            from trl.data_utils import apply_chat_template

            return [apply_chat_template({"messages": p + c}, self.tokenizer)["text"]
                    for p, c in zip(prompts, completions)]
        return [p + c for p, c in zip(prompts, completions)]

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        if self.model is None:
            raise RuntimeError(f"reward model {self.path!r} is not loaded: call load() first")
        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(text=texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                   padding_side="right", add_special_tokens=False).to(device)
            out += self.model(**batch).logits[:, 0].float().tolist()
        return out

    def __repr__(self) -> str:
        return f"RewardModel({self.path!r})"
