"""Classification and embedding (pooling) requests: engine-side helpers, runner-side pooler,
and the frontend API behind ``LLM.classify / embed / score``."""
