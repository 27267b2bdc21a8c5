/**
 * The plugin's hooks as the tests drive them, on a real bridge: what they log, and every
 * message they hand the client, in order (it still goes to the bridge).
 */
import type { UserMessage } from "@opencode-ai/sdk"
import { createHooks, type HookOptions, type Logger, type Outgoing } from "../graphiti-memory.ts"
import type { Cleanups } from "./bridge.ts"

/** The project folder of every test. */
export const WORKTREE = { worktree: "/work/shop", directory: "/work/shop" }

/** A logger that keeps each line as `level message`. */
export function capture(): { log: Logger; lines: string[] } {
  const lines: string[] = []
  return { lines, log: (level, message) => lines.push(`${level} ${message}`) }
}

/** The hooks for the bridge at `url` (fast reconnects, a 300 ms chat deadline unless
 * `options` say otherwise), disposed of after the test. */
export function recordedHooks(cleanups: Cleanups, url: string, options: Partial<HookOptions> = {}) {
  const { log, lines } = capture()
  const made = createHooks(WORKTREE, {
    url,
    deadlineMs: 300,
    maxQueue: 100,
    log,
    client: { backoffInitialMs: 20, backoffMaxMs: 200 },
    ...options,
  })
  cleanups.push(() => made.hooks.dispose?.())
  const sent: Outgoing[] = []
  const { client } = made
  const send = client.send.bind(client)
  const request = client.request.bind(client)
  client.send = (message, onSettled) => {
    sent.push(message)
    send(message, onSettled)
  }
  client.request = (message, deadlineMs) => {
    sent.push(message)
    return request(message, deadlineMs)
  }
  return { ...made, lines, sent }
}

/** A user's prompt in a session, as OpenCode hands it to the chat hook. */
export function promptMessage(sessionID: string, id: string): UserMessage {
  return {
    id,
    sessionID,
    role: "user",
    time: { created: Date.now() },
    agent: "build",
    model: { providerID: "local", modelID: "stub" },
  }
}
