"""llm-hub gateway: one authenticated, rate-limited MCP and HTTP endpoint in front of many bridges."""

from mcp_server import __version__

__all__ = ["__version__"]
