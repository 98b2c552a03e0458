#!/usr/bin/env bash
# Installs the pinned real peers the tests talk to into the git-ignored .peers/ folder:
#   - the Claude Code CLI        (.peers/node_modules/.bin/claude)
#   - the OpenCode server        (.peers/node_modules/opencode-linux-x64*/bin/opencode)
#   - the Codex CLI              (.peers/node_modules/.bin/codex)
#   - GitHub's example payloads  (.peers/node_modules/@octokit/webhooks-examples)
#   - GitHub's OpenAPI description (.peers/node_modules/@octokit/openapi)
#   - Playwright's driver        (.peers/node_modules/playwright-core, for the dashboard's
#                                 browser test; it drives Debian's chromium, never a download)
# and writes .peers/env with AIWG_TEST_CLAUDE, AIWG_TEST_OPENCODE, AIWG_TEST_CODEX,
# AIWG_TEST_OCTOKIT_EXAMPLES, AIWG_TEST_GITHUB_OPENAPI, AIWG_TEST_PLAYWRIGHT and AIWG_TEST_CHROMIUM.
# It also installs bubblewrap (`bwrap`, for `sandbox: bwrap`) and Debian's `chromium` with
# apt-get when they are missing.
# Idempotent: a second run with everything present does nothing.
set -euo pipefail
# apt_install PACKAGE PROGRAM: installs the Debian package when PROGRAM is missing.
apt_install() {
  command -v "$2" >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get install -y "$1" >&2 || { $sudo apt-get update >&2 && $sudo apt-get install -y "$1" >&2; }
  else
    echo "$2 ($1) is missing and apt-get is not available: install it by hand" >&2
    exit 1
  fi
}
apt_install bubblewrap bwrap
bwrap --version >&2
apt_install chromium chromium
chromium_bin=$(command -v chromium)
"$chromium_bin" --version >&2
root=$(cd "$(dirname "$0")/.." && pwd)
peers="$root/.peers"
mkdir -p "$peers"
cd "$peers"
[ -f package.json ] || echo '{"name":"aiwg-peers","private":true}' > package.json

playwright_version=1.65.1
want=(@anthropic-ai/claude-code@2.1.197 opencode-ai@1.18.33 @openai/codex@0.169.0 @octokit/webhooks-examples@7.6.1 @octokit/openapi@23.0.2 "playwright-core@$playwright_version")
need=0
[ -x node_modules/.bin/claude ] || need=1
[ -d node_modules/opencode-ai ] || need=1
[ -x node_modules/.bin/codex ] || need=1
[ -f node_modules/@octokit/webhooks-examples/api.github.com/index.json ] || need=1
[ -f node_modules/@octokit/openapi/generated/api.github.com.deref.json ] || need=1
grep -q "\"version\": \"$playwright_version\"" node_modules/playwright-core/package.json 2>/dev/null || need=1
if [ "$need" = 1 ]; then
  npm install --no-audit --no-fund --loglevel=error "${want[@]}" >&2
fi

claude="$peers/node_modules/.bin/claude"
codex="$peers/node_modules/.bin/codex"
opencode=""
for cand in opencode-linux-x64 opencode-linux-x64-baseline; do
  bin="$peers/node_modules/$cand/bin/opencode"
  if [ -x "$bin" ] && "$bin" --version >/dev/null 2>&1; then opencode="$bin"; break; fi
done
examples="$peers/node_modules/@octokit/webhooks-examples/api.github.com/index.json"
openapi="$peers/node_modules/@octokit/openapi/generated/api.github.com.deref.json"

"$claude" --version >&2
"$codex" --version >&2
[ -n "$opencode" ] || { echo "no runnable opencode binary was installed" >&2; exit 1; }
echo "opencode $("$opencode" --version)" >&2
[ -f "$examples" ] || { echo "octokit examples missing" >&2; exit 1; }
[ -f "$openapi" ] || { echo "GitHub's OpenAPI description is missing" >&2; exit 1; }
playwright="$peers/node_modules/playwright-core"
node -e 'require(process.argv[1])' "$playwright" || { echo "playwright-core does not load" >&2; exit 1; }
echo "playwright-core $playwright_version" >&2

cat > "$peers/env" <<ENV
export AIWG_TEST_CLAUDE="$claude"
export AIWG_TEST_OPENCODE="$opencode"
export AIWG_TEST_CODEX="$codex"
export AIWG_TEST_OCTOKIT_EXAMPLES="$examples"
export AIWG_TEST_GITHUB_OPENAPI="$openapi"
export AIWG_TEST_PLAYWRIGHT="$playwright"
export AIWG_TEST_CHROMIUM="$chromium_bin"
ENV
echo "peers ready: $peers/env" >&2
