"""The registry of diagnosis codes: each code has one meaning, one severity and one exit code.

Every :class:`~attntrace.errors.Diagnosis` checks its code against this table,
and a test checks that every code the sources raise is here and in the README's
table of codes.  Letters: E an error, W a warning (exit 1 under --strict),
I information.  Ranges: 0xx input, 1xx shape, 2xx invariants and layout hints,
3xx model checkpoints and captures, 4xx head scores and chunked attention,
5xx the HTML explorer.

Exit codes: 0 ok · 1 a check or expectation failed · 2 bad input · 3 diagnosed shape error.
"""
from __future__ import annotations

from typing import Dict, NamedTuple


class Code(NamedTuple):
    meaning: str
    exit_code: int          # what the CLI exits with when this code stops a command (warnings: under --strict)


def _input(meaning: str) -> Code:
    return Code(meaning, 2)


def _shape(meaning: str) -> Code:
    return Code(meaning, 3)


def _failed(meaning: str) -> Code:
    return Code(meaning, 1)


def _note(meaning: str) -> Code:
    return Code(meaning, 0)          # information: never a failure, not even under --strict


CODES: Dict[str, Code] = {
    # ---- input: the spec, its files and the command line (exit 2)
    "ATT-E001": _input("the YAML cannot be parsed"),
    "ATT-E002": _input("a key is missing, unknown, or names nothing (a token without an embedding row)"),
    "ATT-E003": _input("a value has the wrong type or is out of its range"),
    "ATT-E004": _input("a nested list is ragged (rows of different lengths)"),
    "ATT-E005": _input("a non-number where a number is needed"),
    "ATT-E006": _input("NaN or infinity in an input array"),
    "ATT-E007": _input("a file is missing or cannot be read, or holds no array of that name"),
    "ATT-E008": _input("the spec is empty"),
    "ATT-E009": _input("the spec's format version is not one this attntrace reads"),
    "ATT-E010": _input("an array or token list is empty, or a size is impossibly large"),
    "ATT-E011": _input("unsafe content refused: YAML tags that build objects, pickled .npy files"),
    "ATT-E012": _input("a key appears twice in one mapping"),
    "ATT-E013": _input("an array file is not a valid .npy, .npz or .safetensors file"),
    "ATT-E014": _input("an optional package this feature needs is not installed"),
    "ATT-E015": _input("no hook point or gradient of that name (or pattern) in this run"),
    "ATT-E016": _input("a hook returned an array of another shape or dtype"),
    "ATT-E017": _input("a command-line selection (--head, --batch, --steps, --layers) is out of range"),
    "ATT-E018": _input("the YAML is too deep or expands too far (alias bombs)"),
    "ATT-E019": _input("a number is too large to represent"),
    "ATT-E020": _input("not enough memory for this run"),
    "ATT-E021": _input("a tolerance is not a finite number ≥ 0"),
    "ATT-E022": _input("a command-line option or argument is invalid"),
    "ATT-E030": _input("explain-shapes: a size flag is not a positive whole number"),
    "ATT-E031": _input("explain-shapes: d_model does not split into the heads"),
    "ATT-E032": _input("explain-shapes: kv heads do not divide the heads"),
    "ATT-E033": _input("explain-shapes: RoPE needs an even d_head"),
    "ATT-E034": _input("no bug of that name in the catalogue"),
    "ATT-E035": _input("explain-shapes: give a spec or sizes, not both"),
    "ATT-E040": _input("mask values do not fit the mask's convention"),
    "ATT-E041": _input("attntrace mask: an option is invalid"),
    "ATT-E042": _input("attntrace positions: an option is invalid"),
    "ATT-E060": _input("a hook action is written wrongly or unknown"),
    "ATT-E061": _input("a hook action's argument is invalid"),
    "ATT-E062": _input("a patch array does not fit the activation"),
    "ATT-E063": _input("a --hook-file cannot be loaded or its hook failed"),
    "ATT-E064": _input("an export or save target is refused (an input, a folder, not writable)"),
    "ATT-E065": _input("a saved trace (.npz/.json) cannot be read"),
    "ATT-E066": _input("an expectation is written wrongly"),
    "ATT-E067": _failed("a hand calculation diverges from the trace"),
    "ATT-E068": _input("--step cannot be combined with --format json"),
    "ATT-E080": _input("the forward trace lacks an array the backward pass needs"),
    "ATT-E081": _input("gradients of transformer blocks are not computed (one attention layer only)"),
    # ---- shape errors found before numpy runs (exit 3)
    "ATT-E101": _shape("a matrix product contracts axes of different sizes"),
    "ATT-E102": _shape("the number of tokens differs from the number of embedding rows"),
    "ATT-E103": _shape("a projection's width does not split into the heads"),
    "ATT-E104": _shape("kv heads do not divide the query heads"),
    "ATT-E105": _shape("an array has the wrong number of axes"),
    "ATT-E106": _shape("batch sizes differ"),
    "ATT-E107": _shape("a bias has the wrong length"),
    "ATT-E108": _shape("the mask does not broadcast to the scores"),
    "ATT-E109": _shape("the learned position table is too small"),
    "ATT-E110": _shape("a norm or MLP weight of a block does not fit d_model / d_mlp"),
    "ATT-E111": _shape("blocks disagree on the number or width of heads"),
    "ATT-E112": _shape("token types (table or ids) do not fit d_model or the tokens"),
    "ATT-E130": _shape("the upstream gradient does not have the output's shape"),
    "ATT-E140": _shape("RoPE needs an even d_head"),
    "ATT-E160": _shape("an expectation's values do not have the selected shape"),
    # ---- model checkpoints (models/)
    "ATT-E300": _input("checkpoint: a file is missing or unreadable"),
    "ATT-E301": _input("safetensors: the file is shorter than its header length"),
    "ATT-E302": _input("safetensors: the header length is impossible"),
    "ATT-E303": _input("safetensors: the header is not a JSON object"),
    "ATT-E304": _input("safetensors: a tensor entry is malformed"),
    "ATT-E305": _input("safetensors: a tensor's dtype is not supported"),
    "ATT-E306": _input("safetensors: a tensor's offsets disagree with its shape"),
    "ATT-E307": _input("safetensors: a tensor lies past the end of the file (truncated)"),
    "ATT-E308": _input("safetensors: tensors overlap"),
    "ATT-E309": _input("safetensors: no tensor of that name, or rows out of range"),
    "ATT-E310": _input("checkpoint: model.safetensors.index.json is malformed"),
    "ATT-E311": _input("checkpoint: a shard named by the index is missing"),
    "ATT-E312": _input("checkpoint: the index places a tensor in a shard that lacks it"),
    "ATT-E313": _input("checkpoint: weights are computed in float32 or float64 only"),
    "ATT-E315": _input("checkpoint: no checkpoint found at that path or package"),
    "ATT-E316": _input("checkpoint: the folder is incomplete or holds several checkpoints"),
    "ATT-E320": _input("checkpoint: config.json is unreadable or not a JSON object"),
    "ATT-E321": _input("checkpoint: this model_type is not supported"),
    "ATT-E322": _input("checkpoint: config.json lacks a required field"),
    "ATT-E323": _input("checkpoint: a config.json value is wrong or inconsistent"),
    "ATT-E324": _input("checkpoint: a feature of this family is not implemented (rope scaling, partial rotary ...)"),
    "ATT-E328": _input("checkpoint: a weight the family needs is missing"),
    "ATT-E329": _input("checkpoint: tensors in the checkpoint that nothing uses"),
    "ATT-E330": _input("checkpoint: a bias the config implies is missing"),
    "ATT-E331": _input("checkpoint: a weight's shape contradicts config.json (head count, d_head, d_model)"),
    "ATT-E332": _input("checkpoint: tied and untied embeddings disagree with the weights"),
    "ATT-E333": _input("a layer selection (--layers) is invalid"),
    "ATT-E334": _input("checkpoint: a weight is not stored as floating point"),
    "ATT-E335": _input("the tokenizers package is not installed"),
    "ATT-E336": _input("tokenizer.json is missing or unusable"),
    "ATT-E337": _input("token ids are invalid (outside the vocabulary, or a bad mask)"),
    "ATT-E338": _input("text is invalid (empty, not a string, or no tokens)"),
    "ATT-E339": _input("the text is longer than the model's learned position table"),
    "ATT-I300": _note("checkpoint: BERT's pooler is present but unused"),
    "ATT-I301": _note("checkpoint: BERT's pre-training heads are present but unused"),
    "ATT-W302": _failed("checkpoint: an untied model without lm_head (no unembedding)"),
    "ATT-W303": _failed("the pad id was chosen because the tokenizer defines none"),
    # ---- captures from PyTorch (models/capture.py, analysis/capture.py)
    "ATT-E340": _input("capture: a bad capture() argument, not a torch module, or torch missing"),
    "ATT-E341": _input("capture: the module was not called inside the capture"),
    "ATT-E342": _input("capture: a recorded tensor was changed in place after recording"),
    "ATT-E343": _input("capture: a tensor of a dtype a capture cannot hold"),
    "ATT-E344": _input("capture: the capture file cannot be written"),
    "ATT-E345": _input("capture: the capture file is missing or unreadable"),
    "ATT-E346": _input("capture: not a valid safetensors file"),
    "ATT-E347": _input("capture: a safetensors file that is not an attntrace capture"),
    "ATT-E348": _input("capture: written by a newer capture format"),
    "ATT-E349": _input("capture: the metadata names a tensor the file lacks, or a shape disagrees"),
    "ATT-E350": _input("capture: the attention cannot be rebuilt (weights, heads or inputs not recorded)"),
    "ATT-E351": _input("capture: a part that cannot be compared yet (soft masks, KV cache, scaled RoPE, whole blocks)"),
    "ATT-E352": _input("capture: a tapped hook name is unknown"),
    "ATT-E353": _input("capture: tap(axes=...) does not fit the tensor"),
    "ATT-E354": _input("capture: the captured weights and inputs do not fit together"),
    "ATT-E355": _input("capture: a tolerance is invalid"),
    "ATT-E356": _input("capture: no such part in the capture"),
    "ATT-W340": _failed("capture: recorded in training mode with dropout (random numbers)"),
    "ATT-W341": _failed("capture: the module was called more than once; the first call is recorded"),
    "ATT-W342": _failed("capture: a hook was tapped more than once; the first is kept"),
    "ATT-W343": _failed("capture: an assumption was made (mask convention, layout)"),
    "ATT-W344": _failed("capture: tapped axes are ambiguous; a layout was assumed"),
    "ATT-W345": _failed("capture: is_causal contradicts attn_mask (PyTorch used causal)"),
    # ---- the head finder (analysis/heads.py)
    "ATT-E400": _input("head scores: the attention patterns do not have the shape (batch, heads, seq_q, seq_k)"),
    "ATT-E401": _input("head scores: a key mask, sink/SEP positions or keep selection has the wrong shape"),
    "ATT-E402": _input("head scores: token ids or token strings do not match (batch, seq)"),
    "ATT-E403": _input("head scores: duplicate-token and induction scores need self-attention (seq_q = seq_k)"),
    "ATT-E404": _input("head scores: the repeated random sequence cannot be built from these arguments"),
    "ATT-E405": _input("head scores: unknown score name or ranking argument"),
    "ATT-E406": _input("head scores: a pattern holds NaN, infinity, negative weights or rows not summing to 1"),
    "ATT-E407": _input("head scores: a sparkline or offset argument is invalid"),
    # ---- chunked attention (core/chunked.py)
    "ATT-E410": _input("chunked attention: Q, K and V shapes do not agree"),
    "ATT-E411": _input("chunked attention: the heads are not a multiple of the kv heads"),
    "ATT-E412": _input("chunked attention: only float32 and float64 are computed"),
    "ATT-E413": _input("chunked attention: a block size or pooling grid is invalid"),
    "ATT-E414": _input("chunked attention: a mask block has the wrong shape or dtype"),
    "ATT-E415": _input("chunked attention: a bias block has the wrong shape"),
    "ATT-E416": _input("chunked attention: the traced query rows are invalid"),
    "ATT-E417": _input("chunked attention: a mask or bias builder argument is invalid"),
    # ---- the HTML explorer (render/explorer.py)
    "ATT-E500": _input("explorer: a layer's attention pattern is not a real 4-axis array"),
    "ATT-E501": _input("explorer: token labels do not fit the pattern"),
    "ATT-E502": _input("explorer: the explorer data is malformed"),
    # ---- attntrace itself
    "ATT-E999": Code("internal error: a bug in attntrace (exit 70)", 70),
    # ---- invariant checks and layout hints (warnings; exit 1 under --strict)
    "ATT-W201": _failed("rows of weights do not sum to 1"),
    "ATT-W202": _failed("masked positions got weight"),
    "ATT-W203": _failed("a query may attend to no key"),
    "ATT-W204": _failed("NaN or infinity appeared in a step"),
    "ATT-W205": _failed("scores are not scaled by the planned factor"),
    "ATT-W220": _failed("axes swapped where their sizes happen to agree"),
    "ATT-W221": _failed("a reshape moves an axis (tokens and heads mixed)"),
    "ATT-W222": _failed("a weight named like nn.Linear's (out, in) is read as (in, out)"),
    "ATT-W224": _failed("under a causal mask, outputs depend on later tokens (--check all)"),
    "ATT-W225": _failed("heads depend on each other's weights (--check all)"),
    "ATT-W230": _failed("an analytic gradient disagrees with finite differences"),
    # ---- the mistakes real projects shipped (analysis/field_checks.py, analysis/crosscheck.py)
    "ATT-W240": _failed("RoPE rotated Q or K differently from its definition (pairs or angles)"),
    "ATT-W241": _failed("positions are not counted from each sequence's first real token"),
    "ATT-W242": _failed("the causal mask is not aligned with the query positions (KV cache)"),
    "ATT-W243": _failed("a sliding window keeps another number of keys than its size"),
    "ATT-W244": _failed("ALiBi slopes are not the paper's geometric sequence"),
    "ATT-W246": _failed("NaN at a masked position reached the scores or the output"),
    "ATT-W247": _failed("the trace differs from an independent recomputation beyond its dtype's rounding "
                        "(--check all)"),
    "ATT-W248": _failed("masked scores hold a finite value (a large negative number) instead of −inf"),
    "ATT-I240": _note("padding query rows attend to no key, by design (e.g. left padding under a causal mask)"),
}


def meaning(code: str) -> str:
    return CODES[code].meaning


def exit_code(code: str) -> int:
    return CODES[code].exit_code


def markdown_rows() -> str:
    """The README's table of codes (`python -m attntrace.codes` prints it; a test compares)."""
    return "\n".join(f"| `{code}` | {entry.exit_code} | {entry.meaning} |" for code, entry in CODES.items())


if __name__ == "__main__":
    print(markdown_rows())
