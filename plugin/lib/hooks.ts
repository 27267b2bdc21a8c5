/**
 * OpenCode's hooks and events, mapped onto the bridge's messages, each with the OpenCode
 * session it belongs to (`session`):
 *
 *   chat.message (the user's text)     -> chat:start. The prompt opens a turn of its
 *                                          session; the first prompt of a session (and the
 *                                          first after a compaction) waits for the reply,
 *                                          whose `inject` becomes the session's memory
 *   experimental.chat.messages.transform
 *                                       -> the session's memory is added to each chat
 *                                          request, never to title or compaction requests
 *                                          (lib/session-memory.ts)
 *   experimental.session.compacting,
 *   event session.compacted            -> the compaction request goes without memory; the
 *                                          requests after it carry it again
 *   event file.edited                  -> file:write, in the session whose tool call wrote
 *                                          the file (lib/activity.ts)
 *   event session.error                -> error
 *   a failed tool call (tool part in
 *         state "error", or a result
 *         with an error or exit code)   -> error naming the tool, its file and the error
 *   event message.updated (assistant,
 *         completed, not tool calls)   -> completion of the turn (lib/turns.ts), only for a
 *                                          turn that wrote a file or hit an error
 *   the `memory` tool (search, save,
 *         forget)                      -> query, note, forget (lib/memory-tool.ts)
 *
 * The chat hook waits for the bridge at most the deadline, and not at all while the bridge
 * is known to be down, then lets the chat go on without memory. No hook ever throws into
 * OpenCode: failures are logged with the prefix "Memory plugin error".
 */
import type { Hooks, PluginInput } from "@opencode-ai/plugin"
import type { Event, ToolPart } from "@opencode-ai/sdk"
import { SessionActivity } from "./activity.ts"
import { BridgeClient, type ClientOptions, type Reply } from "./client.ts"
import { QueueFile } from "./durable-queue.ts"
import { clip, errorText, refusedByPerson, resultFailure, toolFailure, userText } from "./event-text.ts"
import { describe, ERROR_PREFIX, type Logger, safeLogger } from "./log.ts"
import { MEMORY_TOOL, memoryTool } from "./memory-tool.ts"
import { BOUNDS } from "./protocol.ts"
import { SessionMemory } from "./session-memory.ts"
import { projectName, type Settings } from "./settings.ts"
import { type FinishedTurn, Turns } from "./turns.ts"

/** Longest wait for acknowledgements when OpenCode disposes of the plugin. */
const DISPOSE_DRAIN_MS = 500
/** The longest texts the protocol accepts in the messages the hooks send. */
const MAX_QUERY = BOUNDS["chat:start"].query.maxLength
const MAX_ERROR = BOUNDS.error.message.maxLength
const MAX_PATH = BOUNDS["file:write"].path.maxLength

export interface HookOptions extends Settings {
  log: Logger
  /** Passed through to the client (tests shorten the backoff). */
  client?: Partial<ClientOptions>
}

/** The hooks and the client behind them (the client is exposed for tests and dispose). */
export function createHooks(
  input: Pick<PluginInput, "worktree" | "directory">,
  options: HookOptions,
): { hooks: Hooks; client: BridgeClient; project: string } {
  const log = safeLogger(options.log)
  const project = projectName(input, options.project)
  const base = input.directory || input.worktree || process.cwd()
  // Without a queue folder (the tests' default) events wait in memory only.
  const store = options.queueDir
    ? new QueueFile(options.queueDir, { maxEvents: options.maxQueue, log })
    : undefined
  const client = new BridgeClient({
    url: options.url,
    token: options.token,
    maxQueue: options.maxQueue,
    log,
    store,
    ...options.client,
  })
  const memory = new SessionMemory()
  const turns = new Turns(log)
  const activity = new SessionActivity(base)

  const fail = (where: string, error: unknown): void => {
    log("error", `${ERROR_PREFIX} in ${where}: ${describe(error)}`)
  }
  const sessionField = (sessionID: string | undefined): { session?: string } =>
    sessionID ? { session: sessionID } : {}

  /** A failed tool call: an `error` event of its session, once per call. */
  const toolFailed = (
    sessionID: string,
    callID: string,
    tool: string,
    args: unknown,
    error: string,
  ): void => {
    // The memory tool's own failures are the bridge's: the model reads them, memory need not.
    if (tool === MEMORY_TOOL || !error.trim() || !activity.firstFailure(sessionID, callID)) return
    if (refusedByPerson(error)) return
    turns.mark(sessionID, "failed")
    const message = clip(toolFailure(tool, args, error), MAX_ERROR)
    client.send({ type: "error", message, project, session: sessionID })
  }

  const onToolPart = (part: ToolPart): void => {
    const { sessionID, callID, state } = part
    if (typeof sessionID !== "string" || typeof callID !== "string" || !state) return
    switch (state.status) {
      case "pending":
      case "running":
        activity.callStarted(sessionID, callID, state.input, false)
        return
      case "completed":
        activity.callDone(sessionID, callID, state.input)
        return
      case "error":
        activity.callDone(sessionID, callID, state.input)
        if (state.metadata?.interrupted === true) return
        toolFailed(sessionID, callID, part.tool, state.input, String(state.error ?? ""))
        return
    }
  }

  const complete = ({ sessionID, task, tokens, durationMs, summary }: FinishedTurn): void => {
    client.send({
      type: "completion",
      task,
      tokens,
      duration_ms: durationMs,
      ...(summary ? { summary } : {}),
      project,
      session: sessionID,
    })
  }

  /** The context in a chat:start reply: its text, null for none, undefined for no answer. */
  const contextOf = (reply: Reply | undefined): string | null | undefined => {
    if (!reply) return undefined
    if (reply.type !== "context") {
      log("error", `${ERROR_PREFIX} in chat.message: the bridge answered ${describe(reply)}`)
      return undefined
    }
    return typeof reply.inject === "string" && reply.inject ? reply.inject : null
  }

  const hooks: Hooks = {
    tool: {
      [MEMORY_TOOL]: memoryTool({
        client,
        project,
        url: options.url,
        directory: base,
        // The turn's files and errors so far are forgotten: its completion would name them.
        onSessionForgotten: (sessionID) => turns.forget(sessionID),
      }),
    },

    "chat.message": async (hookInput, output) => {
      try {
        const sessionID = hookInput.sessionID
        const text = userText(output.parts)
        turns.open(sessionID, output.message?.id ?? hookInput.messageID, text)
        activity.touch(sessionID)
        if (!text) return
        const deadline = Date.now() + options.deadlineMs
        // The bridge files each event under the latest chat:start of its session, so the
        // events still queued (of earlier turns, or of an earlier run) go first: waiting at
        // most half the deadline, and not at all while the bridge is known to be down.
        if (client.backlog) await client.drained(options.deadlineMs / 2, true)
        const asked = client.request(
          { type: "chat:start", query: clip(text, MAX_QUERY), project, session: sessionID },
          deadline - Date.now(),
        )
        // Only a session's first prompt (and the first after a compaction) waits for memory;
        // the chat:start of any other still opens its turn's task at the bridge.
        if (!memory.wanted(sessionID)) {
          void asked.then(contextOf)
          return
        }
        const context = contextOf(await asked)
        if (context !== undefined) memory.remember(sessionID, context)
      } catch (error) {
        fail("chat.message", error)
      }
    },

    "experimental.chat.messages.transform": async (_hookInput, output) => {
      try {
        if (Array.isArray(output?.messages)) memory.inject(output.messages)
      } catch (error) {
        fail("experimental.chat.messages.transform", error)
      }
    },

    "experimental.session.compacting": async (hookInput) => {
      try {
        if (typeof hookInput?.sessionID === "string") memory.compactionStarts(hookInput.sessionID)
      } catch (error) {
        fail("experimental.session.compacting", error)
      }
    },

    "tool.execute.before": async (hookInput, output) => {
      try {
        activity.callStarted(hookInput.sessionID, hookInput.callID, output?.args, true)
      } catch (error) {
        fail("tool.execute.before", error)
      }
    },

    "tool.execute.after": async (hookInput, output) => {
      try {
        const { sessionID, callID, tool, args } = hookInput
        activity.callDone(sessionID, callID, args)
        const failure = resultFailure(args, output ?? {})
        if (failure) toolFailed(sessionID, callID, tool, args, failure)
      } catch (error) {
        fail("tool.execute.after", error)
      }
    },

    event: async (hookInput: { event: Event }) => {
      const event = hookInput?.event
      try {
        switch (event?.type) {
          case "file.edited": {
            const path = event.properties?.file
            if (typeof path !== "string" || !path) return
            const session = activity.sessionOfFile(path)
            if (session) turns.mark(session, "changed")
            client.send({ type: "file:write", path: clip(path, MAX_PATH), project, ...sessionField(session) })
            return
          }
          case "session.error": {
            const { error, sessionID } = event.properties ?? {}
            if ((error as { name?: string } | undefined)?.name === "MessageAbortedError") return
            const message = errorText(error)
            if (!message) return
            const session = sessionID ?? activity.latestSession()
            if (session) turns.mark(session, "failed")
            client.send({
              type: "error",
              message: clip(message, MAX_ERROR),
              project,
              ...sessionField(session),
            })
            return
          }
          case "message.updated": {
            const info = event.properties?.info
            if (info?.role !== "assistant") return
            const finished = turns.reply(info)
            activity.touch(info.sessionID)
            if (finished) complete(finished)
            return
          }
          case "message.part.updated": {
            const part = event.properties?.part
            if (part?.type === "tool") onToolPart(part)
            else if (part?.type === "text") turns.textPart(part)
            return
          }
          case "session.status": {
            const { sessionID, status } = event.properties ?? {}
            if (typeof sessionID === "string") activity.status(sessionID, status?.type === "idle")
            return
          }
          case "session.idle": {
            const sessionID = event.properties?.sessionID
            if (typeof sessionID === "string") activity.status(sessionID, true)
            return
          }
          case "session.compacted": {
            const sessionID = event.properties?.sessionID
            if (typeof sessionID === "string") memory.compacted(sessionID)
            return
          }
          case "session.created":
          case "session.updated": {
            const info = event.properties?.info
            if (typeof info?.id === "string" && typeof info.parentID === "string" && info.parentID) {
              turns.parent(info.id, info.parentID)
            }
            return
          }
          default:
            return
        }
      } catch (error) {
        fail(`event ${(event as { type?: string } | undefined)?.type ?? "?"}`, error)
      }
    },

    dispose: async () => {
      try {
        // Give events already sent a moment to be acknowledged (bounded; skipped when the
        // bridge is unreachable), then close; what is left waits on disk for the next start.
        if (client.connected && client.backlog) await client.drained(DISPOSE_DRAIN_MS)
        client.close()
      } catch (error) {
        fail("dispose", error)
      }
    },
  }
  client.start()
  return { hooks, client, project }
}
