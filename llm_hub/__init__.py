"""llm-hub's commands: `llm-hub` (the bridge over stdio, `serve`, `check`, `up`) and `llm-hub-gateway`.

The commands sit above both services (`llm-hub up` runs one of each), so they live here, where they may
import the bridge (`mcp_server`) and the gateway (`gateway`), neither of which imports this package.
"""
