"""llm-hub bridge: the models LM Studio serves, as live MCP tools."""

# The single source of the version: pyproject.toml reads it from here (cheaper at start-up than
# asking importlib.metadata, which scans every installed distribution).
__version__ = "0.1.0"
