/**
 * graphiti-memory: the OpenCode plugin of graphiti-bridge.
 *
 * One WebSocket to the bridge, opened at start-up and kept open; OpenCode's hooks and events
 * become the bridge's messages, each with the session it belongs to, and the model gets a
 * `memory` tool. The chat hook waits for memory at most GRAPHITI_BRIDGE_DEADLINE_MS; events
 * wait, in order, in a bounded queue kept on disk until the bridge acknowledges them. No
 * hook ever throws into OpenCode. This file only wires the parts together:
 *
 *   lib/settings.ts        the environment, read once
 *   lib/hooks.ts           OpenCode's hooks and events -> protocol messages
 *   lib/turns.ts           a session's turns, and the completion each ends with
 *   lib/activity.ts        which session an event belongs to when OpenCode does not say
 *   lib/event-text.ts      the texts of prompts, errors and failed tool calls
 *   lib/session-memory.ts  which memory each session carries, and where it goes in a request
 *   lib/memory-tool.ts     the `memory` tool: search, save, forget
 *   lib/client.ts          the bridge client: the socket and the event queue behind it
 *   lib/connection.ts      the socket: reconnects, heartbeat, requests matched to replies
 *   lib/event-queue.ts     the ordered event queue: one in flight, retries, the bound
 *   lib/durable-queue.ts   the queue's file, so events outlive OpenCode
 *   lib/protocol.ts        the wire messages and their bounds, generated from the bridge
 *
 * Environment:
 *   GRAPHITI_BRIDGE_URL          bridge URL (default ws://127.0.0.1:8765)
 *   GRAPHITI_BRIDGE_TOKEN        sent as "Authorization: Bearer <token>" on the handshake
 *   GRAPHITI_BRIDGE_DEADLINE_MS  longest wait for memory in a chat (default 300)
 *   GRAPHITI_BRIDGE_QUEUE        most events held until the bridge has them (default 1000)
 *   GRAPHITI_BRIDGE_QUEUE_DIR    folder of the queue files (default: under the user's state
 *                                directory, one folder per project directory)
 *   GRAPHITI_BRIDGE_PROJECT      project name (default: the worktree's folder name)
 *
 * The modules under lib/ are not plugins themselves: they sit in a folder of their own so
 * that OpenCode, which loads every file of a plugins folder, never takes them for one.
 */
import type { Plugin, PluginInput, PluginModule } from "@opencode-ai/plugin"
import { defaultQueueDir } from "./lib/durable-queue.ts"
import { createHooks } from "./lib/hooks.ts"
import { describe, ERROR_PREFIX, type Logger } from "./lib/log.ts"
import { settingsFromEnv } from "./lib/settings.ts"

export { backoffDelay, BridgeClient, MAX_REFUSALS, type Outgoing, type Reply } from "./lib/client.ts"
export { resultFailure, toolFailure, toolPath, userText } from "./lib/event-text.ts"
export { createHooks, type HookOptions } from "./lib/hooks.ts"
export { describe, ERROR_PREFIX, type Logger, type LogLevel, safeLogger } from "./lib/log.ts"
export { MEMORY_TOOL } from "./lib/memory-tool.ts"
export {
  DEFAULT_DEADLINE_MS,
  DEFAULT_QUEUE,
  DEFAULT_URL,
  projectName,
  type Settings,
  settingsFromEnv,
} from "./lib/settings.ts"
export { SUMMARY_CHARS } from "./lib/turns.ts"

export const SERVICE = "graphiti-memory"

/** A logger that writes to OpenCode's log, or to stderr when that fails. */
function openCodeLogger(input: PluginInput): Logger {
  return (level, message) => {
    const fallback = (): void => console.error(`[${SERVICE}] ${level}: ${message}`)
    try {
      const sent = input.client?.app?.log?.({ body: { service: SERVICE, level, message } })
      if (!sent) fallback()
      else
        void Promise.resolve(sent).then((result) => {
          if ((result as { error?: unknown } | undefined)?.error) fallback()
        }, fallback)
    } catch {
      fallback()
    }
  }
}

/** The OpenCode plugin: settings from the environment, one client per plugin instance. */
export const GraphitiMemoryPlugin: Plugin = async (input) => {
  const log = openCodeLogger(input)
  try {
    const settings = settingsFromEnv(process.env, log)
    const directory = input.directory || input.worktree || process.cwd()
    const queueDir = settings.queueDir ?? defaultQueueDir(process.env, directory)
    return createHooks(input, { ...settings, queueDir, log }).hooks
  } catch (error) {
    log("error", `${ERROR_PREFIX} at start-up: ${describe(error)}`)
    return {}
  }
}

/**
 * OpenCode reads a module whose default export has `id` and `server` as one plugin and
 * ignores its other exports (which the tests use).
 */
const plugin: PluginModule & { id: string } = { id: SERVICE, server: GraphitiMemoryPlugin }
export default plugin
