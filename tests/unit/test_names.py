"""Model names and grouping keys: what counts as the same model."""

import pytest

from foreman.ollama.names import key_model_name, model_key, normalise_model


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("llama3", "llama3:latest"),
        ("llama3:latest", "llama3:latest"),
        ("Llama3:8B", "llama3:8b"),
        ("registry.ollama.ai/library/llama3", "llama3:latest"),
        ("library/llama3:70b", "llama3:70b"),
        ("myhost:5000/team/model", "myhost:5000/team/model:latest"),
        ("  qwen2  ", "qwen2:latest"),
    ],
)
def test_names_normalise_to_ollamas_short_form(name: str, expected: str) -> None:
    """Names that Ollama treats as one model normalise to one string."""
    assert normalise_model(name) == expected


def test_load_options_split_a_model_into_groups() -> None:
    """Different num_ctx means a reload in Ollama, so a different group here."""
    assert model_key("llama3", None) == model_key("llama3:latest", {"temperature": 0.2})
    small = model_key("llama3", {"num_ctx": 2048, "temperature": 1})
    large = model_key("llama3", {"num_ctx": 8192})
    assert small != large
    assert small == 'llama3:latest {"num_ctx":2048}'
    assert key_model_name(large) == "llama3:latest"


def test_option_order_does_not_matter() -> None:
    """The key is canonical whatever order the client wrote options in."""
    assert model_key("m", {"num_gpu": 1, "num_ctx": 4}) == model_key("m", {"num_ctx": 4, "num_gpu": 1})
