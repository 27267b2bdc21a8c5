/**
 * graphiti-memory: the OpenCode plugin of graphiti-bridge.
 *
 * One WebSocket to the bridge (lib/client.ts), opened at start-up and kept open. OpenCode's
 * hooks map onto the bridge's events, each with the OpenCode session it belongs to
 * (`session`):
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
 *                                          the file (see sessionOfFile)
 *   event session.error                -> error
 *   a failed tool call (tool part in
 *         state "error", or a result
 *         with an error or exit code)   -> error naming the tool, its file and the error
 *   event message.updated (assistant,
 *         completed, not tool calls)   -> completion of the turn: task = the prompt,
 *                                          summary = the assistant's final text, tokens
 *                                          and duration summed over the turn's steps;
 *                                          only for a turn that wrote a file or hit an
 *                                          error (a question answered is no task)
 *   the `memory` tool (search, save,
 *         forget)                      -> query, note, forget (lib/memory-tool.ts)
 *
 * The chat hook waits for the bridge at most GRAPHITI_BRIDGE_DEADLINE_MS, and not at all
 * while the bridge is known to be down, then lets the chat go on without memory. Events are
 * sent one at a time, in order; until acknowledged they wait in a bounded queue kept on disk
 * (lib/durable-queue.ts), so they outlive a restart of OpenCode. No hook ever throws into
 * OpenCode: failures are logged with the prefix "Memory plugin error".
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
import type { Hooks, Plugin, PluginInput, PluginModule } from "@opencode-ai/plugin"
import type { AssistantMessage, Event, Part, TextPart, ToolPart } from "@opencode-ai/sdk"
import { basename, relative, resolve } from "node:path"
import { BridgeClient, type ClientOptions, type Reply } from "./lib/client.ts"
import { defaultQueueDir, QueueFile } from "./lib/durable-queue.ts"
import { describe, ERROR_PREFIX, type Logger, safeLogger } from "./lib/log.ts"
import { Memo } from "./lib/memo.ts"
import { MEMORY_TOOL, memoryTool } from "./lib/memory-tool.ts"
import { SessionMemory } from "./lib/session-memory.ts"

export { backoffDelay, BridgeClient, MAX_REFUSALS, type Outgoing, type Reply } from "./lib/client.ts"
export { describe, ERROR_PREFIX, type Logger, type LogLevel, safeLogger } from "./lib/log.ts"
export { MEMORY_TOOL } from "./lib/memory-tool.ts"

export const SERVICE = "graphiti-memory"

export const DEFAULT_URL = "ws://127.0.0.1:8765"
export const DEFAULT_DEADLINE_MS = 300
export const DEFAULT_QUEUE = 1000

/** Longest text the protocol accepts in `query`, `message` and `task`. */
const MAX_TEXT = 65_536
/** How many characters of the user's prompt name a completed task. */
const TASK_CHARS = 500
/** How many characters of the assistant's final answer go into a completion's summary. */
export const SUMMARY_CHARS = 8_000
/** How many characters of a failed command's output go into its error. */
const OUTPUT_CHARS = 2_000
/** How many turns, messages, tool calls and sessions the plugin remembers (oldest forgotten first). */
const MEMO_SIZE = 1000
/** Longest wait for acknowledgements when OpenCode disposes of the plugin. */
const DISPOSE_DRAIN_MS = 500

// ---------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------

export interface Settings {
  url: string
  token?: string
  deadlineMs: number
  maxQueue: number
  /** Folder of the event queue files; undefined: the default for the project directory. */
  queueDir?: string
  project?: string
}

function intSetting(
  env: Record<string, string | undefined>,
  name: string,
  fallback: number,
  log: Logger,
): number {
  const raw = env[name]
  if (raw === undefined || raw.trim() === "") return fallback
  const value = Number(raw)
  if (!Number.isInteger(value) || value < 0) {
    log("warn", `${name}=${JSON.stringify(raw)} is not a whole number >= 0; using ${fallback}`)
    return fallback
  }
  return value
}

/** The plugin's settings from environment variables; bad values fall back to defaults. */
export function settingsFromEnv(env: Record<string, string | undefined>, log: Logger = () => {}): Settings {
  let url = env.GRAPHITI_BRIDGE_URL?.trim() || DEFAULT_URL
  try {
    const parsed = new URL(url)
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") throw new Error("not ws")
  } catch {
    log("warn", `GRAPHITI_BRIDGE_URL=${JSON.stringify(url)} is not a ws:// URL; using ${DEFAULT_URL}`)
    url = DEFAULT_URL
  }
  return {
    url,
    token: env.GRAPHITI_BRIDGE_TOKEN?.trim() || undefined,
    deadlineMs: intSetting(env, "GRAPHITI_BRIDGE_DEADLINE_MS", DEFAULT_DEADLINE_MS, log),
    maxQueue: intSetting(env, "GRAPHITI_BRIDGE_QUEUE", DEFAULT_QUEUE, log),
    queueDir: env.GRAPHITI_BRIDGE_QUEUE_DIR?.trim() || undefined,
    project: env.GRAPHITI_BRIDGE_PROJECT?.trim() || undefined,
  }
}

// ---------------------------------------------------------------------------------------
// The hooks
// ---------------------------------------------------------------------------------------

export interface HookOptions extends Settings {
  log: Logger
  /** Passed through to the client (tests shorten the backoff). */
  client?: Partial<ClientOptions>
}

/** The project name: the setting, else the name of the worktree (or directory) folder. */
export function projectName(input: Pick<PluginInput, "worktree" | "directory">, setting?: string): string {
  if (setting) return setting
  for (const folder of [input.worktree, input.directory]) {
    const name = folder && folder !== "/" ? basename(folder.replace(/[\\/]+$/, "")) : ""
    if (name) return name
  }
  return "default"
}

/** The person's own text in a message: its text parts that OpenCode did not synthesise. */
export function userText(parts: readonly Part[]): string {
  return parts
    .filter((part): part is TextPart => part.type === "text" && !part.synthetic && !part.ignored)
    .map((part) => part.text)
    .join("\n")
    .trim()
}

function clip(text: string, limit: number): string {
  return text.length <= limit ? text : `${text.slice(0, limit - 1)}…`
}

/** The last `limit` characters of a text (a command's output ends with what went wrong). */
function tail(text: string, limit: number): string {
  return text.length <= limit ? text : `…${text.slice(-(limit - 1))}`
}

function errorText(error: unknown): string {
  if (!error || typeof error !== "object") return ""
  const { name, data } = error as { name?: unknown; data?: { message?: unknown } }
  const message = typeof data?.message === "string" ? data.message.trim() : ""
  const label = typeof name === "string" ? name : ""
  return [label, message].filter(Boolean).join(": ")
}

type Args = Record<string, unknown>

function asArgs(value: unknown): Args {
  return value && typeof value === "object" && !Array.isArray(value) ? (value as Args) : {}
}

/** Arguments that name the file a tool works on, in the spellings OpenCode's tools use. */
const PATH_ARGS = ["filePath", "file_path", "path", "file", "filename"]

/** The file a tool call works on, if its arguments name one. */
export function toolPath(args: unknown): string | undefined {
  const given = asArgs(args)
  for (const key of PATH_ARGS) {
    const value = given[key]
    if (typeof value === "string" && value.trim()) return value.trim()
  }
  return undefined
}

/**
 * Tool errors that are no failure: the person refused or interrupted the call (OpenCode's
 * own interface reads these the same way).
 */
const NOT_FAILURES = [
  "Tool execution aborted",
  "QuestionRejectedError",
  "rejected permission",
  "specified a rule",
  "user dismissed",
]

/** The text of an `error` event for a failed tool call: the tool, its file, what went wrong. */
export function toolFailure(tool: string, args: unknown, error: string): string {
  const path = toolPath(args)
  return `Tool ${tool || "?"} failed${path ? ` on ${path}` : ""}: ${error.trim()}`
}

/**
 * What went wrong in a tool call that returned (tool.execute.after), or undefined when
 * nothing did: an `error` in its metadata, or a non-zero `exit` (bash: the exit code,
 * the command and the end of its output).
 */
export function resultFailure(
  args: unknown,
  result: { output?: unknown; metadata?: unknown },
): string | undefined {
  const metadata = asArgs(result?.metadata)
  if (typeof metadata.error === "string" && metadata.error.trim()) return metadata.error.trim()
  const exit = metadata.exit
  if (typeof exit !== "number" || exit === 0) return undefined
  const command = asArgs(args).command
  const output = typeof result.output === "string" ? result.output.trim() : ""
  const ran = typeof command === "string" && command.trim() ? ` from \`${clip(command.trim(), 200)}\`` : ""
  return `exit code ${exit}${ran}${output ? `\n${tail(output, OUTPUT_CHARS)}` : ""}`
}

/** One user turn of a session: the prompt, then what the assistant did up to its answer. */
interface Turn {
  /** The prompt's message id (the `parentID` of the assistant's messages), once known. */
  userID?: string
  prompt?: string
  /** Tokens of the steps so far, and when the first began. */
  tokens: number
  started?: number
  /** Files written and errors hit during the turn. */
  changed: number
  failed: number
  /** The assistant's latest text in the turn (its answer, once the turn ends). */
  text: string
}

/** A tool call, from its start, for finding the session of a file.edited event. */
interface ToolCall {
  sessionID: string
  args: Args
  /** When it started or was last seen (a counter, so later is larger). */
  tick: number
  done: boolean
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
  const memory = new SessionMemory(MEMO_SIZE)

  /** Open turns by key (the prompt's message id), and each session's current turn key. */
  const turns = new Memo<Turn>(MEMO_SIZE)
  const currentTurn = new Memo<string>(MEMO_SIZE)
  /** Assistant messages seen, those already reported, and their text parts by part id. */
  const assistants = new Memo<true>(MEMO_SIZE)
  const completed = new Memo<true>(MEMO_SIZE)
  const texts = new Memo<Map<string, string>>(MEMO_SIZE)
  /** Tool calls by session and call id, and the calls whose failure was reported. */
  const calls = new Memo<ToolCall>(MEMO_SIZE)
  const reported = new Memo<true>(MEMO_SIZE)
  /** When each session last went busy (deleted when it goes idle), and was last active. */
  const busy = new Memo<number>(MEMO_SIZE)
  const active = new Memo<number>(MEMO_SIZE)
  /** The parent of each sub-agent session. */
  const parents = new Memo<string>(MEMO_SIZE)
  let tick = 0

  const fail = (where: string, error: unknown): void => {
    log("error", `${ERROR_PREFIX} in ${where}: ${describe(error)}`)
  }
  const touch = (sessionID: string): void => active.set(sessionID, ++tick)
  const sessionField = (sessionID: string | undefined): { session?: string } =>
    sessionID ? { session: sessionID } : {}

  /** The session's current turn; one without a prompt if none is open. */
  const turnOf = (sessionID: string): Turn => {
    const key = currentTurn.get(sessionID)
    const turn = key === undefined ? undefined : turns.get(key)
    if (turn) return turn
    const fresh: Turn = { tokens: 0, changed: 0, failed: 0, text: "" }
    const freshKey = `${sessionID}\u0000${++tick}`
    turns.set(freshKey, fresh)
    currentTurn.set(sessionID, freshKey)
    return fresh
  }

  /** The turn an assistant message belongs to (its parentID is the turn's prompt). */
  const turnOfReply = (info: AssistantMessage): Turn => {
    const key = currentTurn.get(info.sessionID)
    let turn = key === undefined ? undefined : turns.get(key)
    if (turn?.userID !== info.parentID) {
      if (turn && turn.userID === undefined && key !== undefined) {
        // Opened by a file or an error before the plugin saw this turn's prompt.
        turns.delete(key)
        turn.userID = info.parentID
      } else {
        turn = turns.get(info.parentID) ?? {
          userID: info.parentID,
          tokens: 0,
          changed: 0,
          failed: 0,
          text: "",
        }
      }
      turns.set(info.parentID, turn)
      currentTurn.set(info.sessionID, info.parentID)
    }
    return turn
  }

  /** Count a file written or an error in the session's turn, and in its parents' turns. */
  const mark = (sessionID: string, what: "changed" | "failed"): void => {
    let session: string | undefined = sessionID
    for (let depth = 0; session && depth < 8; depth++) {
      turnOf(session)[what]++
      session = parents.get(session)
    }
  }

  /**
   * The session a file.edited event belongs to (the event does not say). In this order:
   * the session of the latest tool call still running whose arguments name the file
   * (OpenCode publishes file.edited while the tool that wrote it runs); then of the latest
   * finished call that named it; then of the latest call still running; then the session
   * that went busy last and is not idle yet; then the session that was active last.
   */
  const sessionOfFile = (file: string): string | undefined => {
    const target = resolve(base, file)
    const relativePath = relative(base, target)
    const names = (args: Args): boolean =>
      Object.values(args).some((value) => {
        if (typeof value !== "string" || !value) return false
        if (!value.includes("\n")) return value.length <= 4096 && resolve(base, value.trim()) === target
        // A patch names its files in its text.
        return value.includes(target) || (!relativePath.startsWith("..") && value.includes(relativePath))
      })
    let best: { session: string; rank: number; tick: number } | undefined
    const consider = (session: string, rank: number, at: number): void => {
      if (!best || rank > best.rank || (rank === best.rank && at > best.tick))
        best = { session, rank, tick: at }
    }
    for (const [, call] of calls.entries()) {
      const named = names(call.args)
      if (named || !call.done) consider(call.sessionID, named ? (call.done ? 3 : 4) : 2, call.tick)
    }
    for (const [session, at] of busy.entries()) consider(session, 1, at)
    for (const [session, at] of active.entries()) consider(session, 0, at)
    return best?.session
  }

  /** The session of an event that does not name one: the one that was active last. */
  const latestSession = (): string | undefined => {
    let latest: [string, number] | undefined
    for (const [session, at] of busy.entries()) if (!latest || at > latest[1]) latest = [session, at]
    if (latest) return latest[0]
    for (const [session, at] of active.entries()) if (!latest || at > latest[1]) latest = [session, at]
    return latest?.[0]
  }

  const callKey = (sessionID: string, callID: string): string => `${sessionID}\u0000${callID}`

  /** A tool call started (or was seen running): remember its arguments and session. */
  const callStarted = (sessionID: string, callID: string, args: unknown, restart: boolean): void => {
    const key = callKey(sessionID, callID)
    const known = calls.get(key)
    const given = asArgs(args)
    if (restart || !known) {
      if (restart) reported.delete(key)
      calls.set(key, { sessionID, args: given, tick: ++tick, done: false })
    } else if (Object.keys(given).length) {
      known.args = given
    }
    touch(sessionID)
  }

  const callDone = (sessionID: string, callID: string, args: unknown): void => {
    const key = callKey(sessionID, callID)
    const known = calls.get(key)
    if (known) known.done = true
    else calls.set(key, { sessionID, args: asArgs(args), tick: ++tick, done: true })
  }

  /** A tool call failed: an `error` event of its session, once per call. */
  const toolFailed = (
    sessionID: string,
    callID: string,
    tool: string,
    args: unknown,
    error: string,
  ): void => {
    const key = callKey(sessionID, callID)
    // The memory tool's own failures are the bridge's: the model reads them, memory need not.
    if (tool === MEMORY_TOOL || reported.has(key) || !error.trim()) return
    reported.set(key, true)
    if (NOT_FAILURES.some((phrase) => error.includes(phrase))) return
    mark(sessionID, "failed")
    const message = clip(toolFailure(tool, args, error), MAX_TEXT)
    client.send({ type: "error", message, project, session: sessionID })
  }

  const onToolPart = (part: ToolPart): void => {
    const { sessionID, callID, state } = part
    if (typeof sessionID !== "string" || typeof callID !== "string" || !state) return
    switch (state.status) {
      case "pending":
      case "running":
        callStarted(sessionID, callID, state.input, false)
        return
      case "completed":
        callDone(sessionID, callID, state.input)
        return
      case "error":
        callDone(sessionID, callID, state.input)
        if (state.metadata?.interrupted === true) return
        toolFailed(sessionID, callID, part.tool, state.input, String(state.error ?? ""))
        return
    }
  }

  const onTextPart = (part: TextPart): void => {
    if (part.synthetic || part.ignored || !assistants.has(part.messageID)) return
    const parts = texts.get(part.messageID) ?? new Map<string, string>()
    parts.set(part.id, typeof part.text === "string" ? part.text : "")
    texts.set(part.messageID, parts)
  }

  /** The text of an assistant message, its parts in OpenCode's order (by id). */
  const messageText = (messageID: string): string => {
    const parts = texts.get(messageID)
    if (!parts) return ""
    return [...parts.entries()]
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([, text]) => text.trim())
      .filter(Boolean)
      .join("\n")
  }

  /**
   * An assistant message was updated. The messages of one turn share the prompt as their
   * parent: one that ends in tool calls is a step, whose tokens, start and text carry over
   * to the message that ends the turn. That one reports the turn as a completion, with the
   * prompt as its task and the assistant's final text as its summary, if the turn changed a
   * file or hit an error; a turn that did neither (a question answered, say) is no task.
   */
  const onReply = (info: AssistantMessage): void => {
    assistants.set(info.id, true)
    const turn = turnOfReply(info)
    touch(info.sessionID)
    const finished = info.time?.completed
    if (!finished || completed.has(info.id)) return
    completed.set(info.id, true)
    const text = messageText(info.id)
    texts.delete(info.id)
    if (text) turn.text = text
    if (info.error) return // reported by session.error
    const tokens = info.tokens as (AssistantMessage["tokens"] & { total?: number }) | undefined
    const used =
      typeof tokens?.total === "number"
        ? tokens.total
        : (tokens?.input ?? 0) + (tokens?.output ?? 0) + (tokens?.reasoning ?? 0)
    turn.tokens += Number.isFinite(used) ? Math.max(0, used) : 0
    turn.started = Math.min(turn.started ?? info.time.created, info.time.created)
    if (info.finish === "tool-calls" || info.finish === "tool_calls") return
    const { changed, failed, tokens: total, started, text: answer } = turn
    // The turn is over; anything after this under the same prompt starts from nothing.
    Object.assign(turn, { tokens: 0, started: undefined, changed: 0, failed: 0, text: "" })
    if (!changed && !failed) {
      log(
        "debug",
        `turn ${info.parentID} of ${info.sessionID} changed nothing and hit no error: no completion`,
      )
      return
    }
    const task = turn.prompt
      ? clip(turn.prompt, TASK_CHARS)
      : `reply from ${info.providerID}/${info.modelID} in session ${info.sessionID}`
    const summary = clip(answer, SUMMARY_CHARS)
    client.send({
      type: "completion",
      task,
      tokens: Math.round(total),
      duration_ms: Math.max(0, finished - (started ?? finished)),
      ...(summary ? { summary } : {}),
      project,
      session: info.sessionID,
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
        onSessionForgotten: (sessionID) => Object.assign(turnOf(sessionID), { changed: 0, failed: 0 }),
      }),
    },

    "chat.message": async (hookInput, output) => {
      try {
        const sessionID = hookInput.sessionID
        const text = userText(output.parts)
        const messageID = output.message?.id ?? hookInput.messageID
        // A prompt opens a turn; its replies find it by their parentID, the prompt's id.
        const key = messageID ?? `${sessionID}\u0000${++tick}`
        turns.set(key, {
          userID: messageID,
          prompt: text || undefined,
          tokens: 0,
          changed: 0,
          failed: 0,
          text: "",
        })
        currentTurn.set(sessionID, key)
        touch(sessionID)
        if (!text) return
        const deadline = Date.now() + options.deadlineMs
        // The bridge files each event under the latest chat:start of its session, so the
        // events still queued (of earlier turns, or of an earlier run) go first: waiting at
        // most half the deadline, and not at all while the bridge is known to be down.
        if (client.backlog) await client.drained(options.deadlineMs / 2, true)
        const asked = client.request(
          { type: "chat:start", query: clip(text, MAX_TEXT), project, session: sessionID },
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
        callStarted(hookInput.sessionID, hookInput.callID, output?.args, true)
      } catch (error) {
        fail("tool.execute.before", error)
      }
    },

    "tool.execute.after": async (hookInput, output) => {
      try {
        const { sessionID, callID, tool, args } = hookInput
        callDone(sessionID, callID, args)
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
            const session = sessionOfFile(path)
            if (session) mark(session, "changed")
            client.send({ type: "file:write", path: clip(path, 4096), project, ...sessionField(session) })
            return
          }
          case "session.error": {
            const { error, sessionID } = event.properties ?? {}
            if ((error as { name?: string } | undefined)?.name === "MessageAbortedError") return
            const message = errorText(error)
            if (!message) return
            const session = sessionID ?? latestSession()
            if (session) mark(session, "failed")
            client.send({
              type: "error",
              message: clip(message, MAX_TEXT),
              project,
              ...sessionField(session),
            })
            return
          }
          case "message.updated": {
            const info = event.properties?.info
            if (info?.role === "assistant") onReply(info)
            return
          }
          case "message.part.updated": {
            const part = event.properties?.part
            if (part?.type === "tool") onToolPart(part)
            else if (part?.type === "text") onTextPart(part)
            return
          }
          case "session.status": {
            const { sessionID, status } = event.properties ?? {}
            if (typeof sessionID !== "string") return
            if (status?.type === "idle") busy.delete(sessionID)
            else if (!busy.has(sessionID)) busy.set(sessionID, ++tick)
            return
          }
          case "session.idle": {
            const sessionID = event.properties?.sessionID
            if (typeof sessionID === "string") busy.delete(sessionID)
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
              parents.set(info.id, info.parentID)
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
