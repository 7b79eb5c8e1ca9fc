"""lm-eval's model interface backed by a megatron model (the only module, with tasks.py's loader, that imports
lm_eval).

lm-eval runs on the driver only, so for lm-eval this model is a world of one (rank 0 of 1): it tokenizes,
and the engine spreads the token work over every data-parallel replica. Tokenization follows lm-eval's own
rules for causal models (TemplateLM): trailing context spaces move into the continuation, the continuation's
tokens are the tail of the whole text's tokens, an empty context becomes the prefix token (BOS, else EOD),
no BOS is added unless asked; sequences longer than the model's context are cut from the left.
"""

from __future__ import annotations

from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from megatron_minitron.evaluation.engine import Engine, GenerationRow, ScoreRow

DEFAULT_MAX_GEN_TOKS = 256
"""New tokens generated when a task gives no max_gen_toks (lm-eval's Hugging Face backend uses the same)."""


class MegatronLM(TemplateLM):
    """An lm-eval LM whose forward passes run on a megatron model at any TP/PP/DP (see engine.py)."""

    def __init__(self, *, engine: Engine, tokenizer, add_bos_token: bool = False,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> None:
        super().__init__()
        self.engine, self._tokenizer, self.add_bos_token = engine, tokenizer, add_bos_token
        self.max_gen_toks = max_gen_toks

    # -------------------------------------------------------------------------------- tokenization
    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        bos = self._tokenizer.bos
        return bos if bos is not None else self._tokenizer.eod

    @property
    def max_length(self) -> int:
        return self.engine.max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        ids = list(self._tokenizer.tokenize(string))
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        bos = self._tokenizer.bos
        if add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def tok_decode(self, tokens, **kwargs) -> str:
        return self._tokenizer.detokenize([tokens] if isinstance(tokens, int) else tokens)

    # -------------------------------------------------------------------------------- requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for (_, context, continuation) in requests:
            if not continuation:
                raise ValueError("lm-eval asked for the log-likelihood of an empty continuation")
            tokens = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append(ScoreRow(tokens=tuple(tokens), continuation=len(continuation)))
        results = self.engine.score(rows)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of at most max_length tokens (lm-eval's rule:
        the first window is conditioned on the prefix token, each later one on the tokens before it)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                context, continuation = make_disjoint_window(window)
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string, EOD or max_gen_toks; the stop string is cut off."""
        eos = self.tok_decode([self.eot_token_id])
        rows, stops = [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs)
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError(f"this model generates greedily only; the task asks for sampling ({gen_kwargs})")
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            until = [stop for stop in until if stop]
            if eos and eos not in until:  # a SentencePiece eos decodes to "": EOD itself still stops the row
                until.append(eos)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} must be less than the model's context ({self.max_length})")
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            rows.append(GenerationRow(context=tuple(ids), max_new_tokens=max_new, stop=tuple(until)))
            stops.append(until)
        outputs = []
        for req, new, until in zip(requests, self.engine.generate(rows), stops):
            text = self.tok_decode(new)
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            outputs.append(text)
        return outputs
