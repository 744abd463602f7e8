#!/usr/bin/env bash
# The gateway's plain HTTP API with nothing but curl: list the tools, call a chat tool (one JSON
# answer), then make the same call streamed (server-sent events as the text is generated).
#
#   LLM_HUB_API_KEY=... examples/curl.sh [tool] [prompt]
#
# LLM_HUB_URL defaults to http://127.0.0.1:8080 (what `llm-hub up` serves). Without a tool name
# the first chat_ tool the gateway lists is used.
set -euo pipefail

url=${LLM_HUB_URL:-http://127.0.0.1:8080}
url=${url%/}
key=${LLM_HUB_API_KEY:-}
if [[ -z $key ]]; then
  echo "LLM_HUB_API_KEY is not set: export one of the keys the gateway accepts (its LLM_HUB_API_KEYS)." >&2
  exit 2
fi
tool=${1:-}
prompt=${2:-Say hello in five words.}

# curl with the key. The header is read from stdin (-H @-), so the key never shows in `ps`.
hub() {
  printf 'Authorization: Bearer %s\n' "$key" | curl --silent --show-error --fail-with-body -H @- "$@"
}

echo "== GET $url/v1/tools"
if ! tools=$(hub "$url/v1/tools"); then
  echo "Could not list the tools at $url: ${tools:-no answer}" >&2
  exit 1
fi
# Only the tool names (the full answer also holds each tool's schemas). grep and sed: no jq needed.
names=$(grep -o '"name": *"[^"]*"' <<<"$tools" | sed 's/"name": *"\(.*\)"/\1/' || true)
echo "$names"

if [[ -z $tool ]]; then
  tool=$(grep -m 1 '^chat_' <<<"$names" || true)
  if [[ -z $tool ]]; then
    echo "The gateway lists no chat_ tool: is a language model available in LM Studio?" >&2
    exit 1
  fi
fi

# The body is the tool's arguments as a JSON object; escape backslashes and quotes in the prompt.
prompt=${prompt//\\/\\\\}
prompt=${prompt//\"/\\\"}
body="{\"prompt\": \"$prompt\"}"

echo
echo "== POST $url/v1/tools/$tool (JSON: the whole result at once)"
hub -H 'Content-Type: application/json' -d "$body" "$url/v1/tools/$tool"
echo

echo
echo "== POST $url/v1/tools/$tool (streamed: progress events as text arrives, then the result)"
hub -N -H 'Content-Type: application/json' -H 'Accept: text/event-stream' -d "$body" "$url/v1/tools/$tool"
