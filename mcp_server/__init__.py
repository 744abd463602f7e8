"""llm-hub bridge: the models LM Studio serves, as live MCP tools."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llm-hub")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
