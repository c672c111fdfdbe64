"""Ollama ``Modelfile`` for an exported GGUF: FROM, ADAPTER, TEMPLATE (Ollama's Go template syntax), stops, PARAMETER.

Ollama does not run Jinja, so the run's chat template is recognised by its turn markers and written as the Go
template that renders the same text for the three chat formats the toolkit trains (Gemma, Llama 3, ChatML/Qwen2).
"""

from __future__ import annotations

GEMMA = """{{- $sys := "" }}{{ if .System }}{{ $sys = printf "%s\\n\\n" .System }}{{ end }}
{{- $first := true }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $first }}{{ $sys }}{{ $first = false }}{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}"""

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ if $last }}<|im_start|>assistant
{{ end }}
{{- else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}"""

LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- if and $last (eq .Role "user") }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
{{- end }}"""

# marker in the Jinja template -> (format name, Ollama template, stop strings)
FORMATS = (
    ("<start_of_turn>", "gemma", GEMMA, ["<end_of_turn>"]),
    ("<|start_header_id|>", "llama3", LLAMA3, ["<|eot_id|>"]),
    ("<|im_start|>", "chatml", CHATML, ["<|im_end|>"]),
)


def chat_format(jinja: str | None) -> tuple[str, str, list[str]] | None:
    """(name, Ollama template, stops) for the run's Jinja chat template, or None when it is none of the three."""
    for marker, name, tmpl, stops in FORMATS:
        if jinja and marker in jinja:
            return name, tmpl, stops
    return None


def modelfile(
    model: str, adapter: str | None, jinja: str | None, num_ctx: int, turns: bool = False
) -> tuple[str, str | None]:
    """(Modelfile text, chat format name or None). Paths are relative to the Modelfile's folder. ``turns``: a run
    trained raw from rows written as turns (raw-turns.jinja), whose prompts end with a newline unless they end in a
    colon; an Ollama template cannot test a prompt's last character, so the Modelfile says it instead.

    temperature 0: the answers were verified greedy; raise it in Ollama for sampling."""
    lines = [f"FROM ./{model}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    fmt = chat_format(jinja)
    if jinja is None:  # a run trained raw (template: raw): the prompt is the text the model continues
        lines.append("# no chat template: this model was trained on plain prompt + completion text (template: raw)")
        if turns:
            lines.append(
                "# trained from turns (raw-turns.jinja): end a prompt with a newline unless it ends in a colon"
            )
            lines.append("# (then the model writes a space and the answer), as the training rows were rendered")
        lines.append('TEMPLATE """{{ .Prompt }}"""')
        fmt = ("raw", "", [])
    elif fmt is None:
        lines.append("# no TEMPLATE: the run's chat template is not Gemma, Llama 3 or ChatML; Ollama falls back")
        lines.append("# to the template it detects from the GGUF's tokenizer.chat_template")
    else:
        name, tmpl, stops = fmt
        lines.append(f'TEMPLATE """{tmpl}"""')
        lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0", f"PARAMETER num_ctx {num_ctx}"]
    return "\n".join(lines) + "\n", fmt[0] if fmt else None
