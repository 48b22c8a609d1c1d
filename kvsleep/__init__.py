"""kvsleep: route OpenAI traffic by model and put idle vLLM/SGLang engines to sleep."""

__version__ = "0.1.0"
