/**
 * graphiti-memory: the OpenCode plugin of graphiti-bridge.
 *
 * One WebSocket to the bridge, opened at start-up and kept open; every message is a
 * MessagePack map in a binary frame (docs/protocol.md). OpenCode's hooks map onto the
 * bridge's events, each with the OpenCode session it belongs to (`session`):
 *
 *   chat.message (the user's text)     -> chat:start; the reply's `inject` is added to the
 *                                          message as a synthetic text part. The prompt
 *                                          opens a turn of its session.
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
 *
 * The chat hook waits for the bridge at most GRAPHITI_BRIDGE_DEADLINE_MS and then lets the
 * chat go on without memory. Events are sent one at a time, each after the previous one's
 * ack (the bridge handles a connection's messages concurrently, so this is what keeps them
 * in order); while the bridge is unreachable they wait in a bounded queue. No hook ever
 * throws into OpenCode: failures are logged with the prefix "Memory plugin error".
 *
 * Environment:
 *   GRAPHITI_BRIDGE_URL          bridge URL (default ws://127.0.0.1:8765)
 *   GRAPHITI_BRIDGE_TOKEN        sent as "Authorization: Bearer <token>" on the handshake
 *   GRAPHITI_BRIDGE_DEADLINE_MS  longest wait for memory in a chat (default 300)
 *   GRAPHITI_BRIDGE_QUEUE        most events held while disconnected (default 1000)
 *   GRAPHITI_BRIDGE_PROJECT      project name (default: the worktree's folder name)
 */
import { decode, encode } from "@msgpack/msgpack"
import type { Hooks, Plugin, PluginInput, PluginModule } from "@opencode-ai/plugin"
import type { AssistantMessage, Event, Part, TextPart, ToolPart } from "@opencode-ai/sdk"
import { basename, relative, resolve } from "node:path"

export const ERROR_PREFIX = "Memory plugin error"
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

export type LogLevel = "debug" | "info" | "warn" | "error"
export type Logger = (level: LogLevel, message: string) => void

// ---------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------

export interface Settings {
  url: string
  token?: string
  deadlineMs: number
  maxQueue: number
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
    project: env.GRAPHITI_BRIDGE_PROJECT?.trim() || undefined,
  }
}

// ---------------------------------------------------------------------------------------
// The client: one socket, a bounded event queue, request/reply by id with a deadline
// ---------------------------------------------------------------------------------------

/** A message to the bridge (the client adds `id`). */
export type Outgoing = { type: string } & Record<string, unknown>
/** A reply from the bridge. */
export type Reply = { type: string; id?: unknown } & Record<string, unknown>

export interface ClientOptions {
  url: string
  token?: string
  /** Most events held at once, queued or sent and not yet acknowledged. */
  maxQueue: number
  log: Logger
  /** First reconnect delay; doubles per failed attempt up to backoffMaxMs, with jitter. */
  backoffInitialMs?: number
  backoffMaxMs?: number
  /** A handshake that takes longer than this is abandoned and retried. */
  connectTimeoutMs?: number
  /** Idle ping period; a ping unanswered after heartbeatTimeoutMs drops the connection. */
  heartbeatMs?: number
  heartbeatTimeoutMs?: number
}

export interface ClientStats {
  /** Events handed to the socket (a resend after a reconnect counts again). */
  sent: number
  /** Events the bridge acknowledged as stored. */
  acked: number
  /** Events the bridge refused for good (ack with ok:false, not retryable or out of tries). */
  refused: number
  /** Resends after a retryable refusal (overloaded, memory_unavailable). */
  retried: number
  /** Events dropped because the queue was full. */
  dropped: number
  /** Connections opened, the first one included. */
  connects: number
}

type State = "idle" | "connecting" | "open" | "closed"
type Queued = { message: Outgoing; refusals: number }

/** Refusals an event may get for a retryable reason before it is given up. */
export const MAX_REFUSALS = 6

/** Reconnect delay for a 0-based attempt: capped exponential, with jitter in [d/2, d]. */
export function backoffDelay(attempt: number, initialMs: number, maxMs: number): number {
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30))
  return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2)
}

function unref(timer: ReturnType<typeof setTimeout>): void {
  // A pending reconnect or heartbeat must never keep OpenCode's process alive.
  ;(timer as { unref?: () => void }).unref?.()
}

/** A logger that never throws (a failing logger must not reach OpenCode either). */
export function safeLogger(log: Logger): Logger {
  return (level, message) => {
    try {
      log(level, message)
    } catch {
      // nowhere left to report it
    }
  }
}

/** Text of an error, for logs. */
export function describe(error: unknown): string {
  if (error instanceof Error) return `${error.name}: ${error.message}`
  try {
    return typeof error === "string" ? error : JSON.stringify(error)
  } catch {
    return String(error)
  }
}

export class BridgeClient {
  readonly stats: ClientStats = { sent: 0, acked: 0, refused: 0, retried: 0, dropped: 0, connects: 0 }

  private readonly opts: Required<Omit<ClientOptions, "token">> & { token?: string }
  private state: State = "idle"
  private ws: WebSocket | null = null
  private nextId = 1
  private attempt = 0
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null
  private connectTimer: ReturnType<typeof setTimeout> | null = null
  private heartbeat: ReturnType<typeof setInterval> | null = null
  private pingSentAt: number | null = null
  private droppedThisOutage = 0
  /** Events waiting to be sent, oldest first, with the refusals each has had. */
  private queue: Queued[] = []
  /** The event sent on the current socket and not yet acknowledged, with its id. */
  private inflight: (Queued & { id: number }) | null = null
  /** After a retryable refusal, nothing is sent before this time (ms since the epoch). */
  private holdUntil = 0
  private retryTimer: ReturnType<typeof setTimeout> | null = null
  /** Requests waiting for their reply, by id. */
  private waiting = new Map<number, (reply: Reply | undefined) => void>()
  private openWaiters = new Set<() => void>()
  private drainWaiters = new Set<() => void>()

  constructor(options: ClientOptions) {
    this.opts = {
      backoffInitialMs: 250,
      backoffMaxMs: 30_000,
      connectTimeoutMs: 5_000,
      heartbeatMs: 15_000,
      heartbeatTimeoutMs: 10_000,
      ...options,
      log: safeLogger(options.log),
    }
  }

  /** True while the socket is open. */
  get connected(): boolean {
    return this.state === "open"
  }

  /** Events queued or sent and not yet acknowledged. */
  get backlog(): number {
    return this.queue.length + (this.inflight ? 1 : 0)
  }

  /** Open the connection (and keep it open until close()). Never throws. */
  start(): void {
    if (this.state !== "idle") return
    this.connect()
    this.heartbeat = setInterval(() => this.beat(), this.opts.heartbeatMs)
    unref(this.heartbeat)
  }

  /** Close the connection for good; queued events are discarded. */
  close(): void {
    if (this.state === "closed") return
    this.state = "closed"
    for (const timer of [this.reconnectTimer, this.connectTimer, this.retryTimer])
      if (timer) clearTimeout(timer)
    if (this.heartbeat) clearInterval(this.heartbeat)
    const ws = this.ws
    this.ws = null
    try {
      ws?.close(1000, "plugin closed")
    } catch (error) {
      this.opts.log("debug", `closing the socket: ${describe(error)}`)
    }
    this.failWaiting()
    for (const wake of this.openWaiters) wake()
    this.openWaiters.clear()
    for (const wake of this.drainWaiters) wake()
    this.drainWaiters.clear()
  }

  /**
   * Send an event that the bridge acknowledges (file:write, error, completion). Events go
   * out one at a time in the order given, each once the previous one is acknowledged, so
   * the bridge stores them in that order; an event whose socket died before its ack is
   * resent first after the reconnect. Never throws; a full queue drops the new event and
   * counts it.
   */
  send(message: Outgoing): void {
    if (this.state === "closed") {
      this.stats.dropped++
      return
    }
    if (this.backlog >= this.opts.maxQueue) {
      this.stats.dropped++
      this.droppedThisOutage++
      if (this.droppedThisOutage === 1) {
        this.opts.log(
          "warn",
          `event queue full (${this.opts.maxQueue}); dropping ${message.type} events until the bridge catches up`,
        )
      }
      return
    }
    // Stamped now: a replay after a reconnect keeps the event's own time, and its id makes
    // a resend of an event whose ack was lost harmless (the bridge stores an id once).
    const stamped = { at: Date.now() / 1000, episode_id: crypto.randomUUID(), ...message }
    this.queue.push({ message: stamped, refusals: 0 })
    this.pump()
  }

  /**
   * Send a request and wait for its reply at most `deadlineMs`, counting the time spent
   * waiting for the connection to open. Undefined when the deadline passed, the bridge is
   * unreachable or the connection dropped meanwhile. Requests are never queued.
   */
  async request(message: Outgoing, deadlineMs: number): Promise<Reply | undefined> {
    if (this.state === "closed" || this.state === "idle" || deadlineMs <= 0) return undefined
    const deadline = Date.now() + deadlineMs
    if (this.state !== "open") {
      await this.waitFor(this.openWaiters, deadlineMs)
      if (!this.connected) return undefined
    }
    const id = this.nextId++
    return await new Promise<Reply | undefined>((resolve) => {
      const timer = setTimeout(() => finish(undefined), Math.max(0, deadline - Date.now()))
      const finish = (reply: Reply | undefined): void => {
        clearTimeout(timer)
        this.waiting.delete(id)
        resolve(reply)
      }
      this.waiting.set(id, finish)
      if (!this.write({ ...message, id })) finish(undefined)
    })
  }

  /** Wait (at most timeoutMs) until every event was acknowledged; true if it was. */
  async drained(timeoutMs: number): Promise<boolean> {
    if (this.backlog === 0) return true
    await this.waitFor(this.drainWaiters, timeoutMs)
    return this.backlog === 0
  }

  /** Wait (at most timeoutMs) until the socket is open; true if it is. */
  async opened(timeoutMs: number): Promise<boolean> {
    if (this.state === "open") return true
    await this.waitFor(this.openWaiters, timeoutMs)
    return this.connected
  }

  // -- internals ----------------------------------------------------------------------

  private async waitFor(waiters: Set<() => void>, timeoutMs: number): Promise<void> {
    await new Promise<void>((resolve) => {
      const wake = (): void => {
        clearTimeout(timer)
        waiters.delete(wake)
        resolve()
      }
      const timer = setTimeout(wake, Math.max(0, timeoutMs))
      waiters.add(wake)
    })
  }

  private connect(): void {
    if (this.state === "closed") return
    this.state = "connecting"
    let ws: WebSocket
    try {
      const headers: Record<string, string> = {}
      if (this.opts.token) headers.Authorization = `Bearer ${this.opts.token}`
      // Bun's WebSocket takes handshake headers as a second argument; the token never
      // goes into the URL.
      ws = new WebSocket(this.opts.url, { headers })
      ws.binaryType = "arraybuffer"
    } catch (error) {
      this.opts.log("error", `${ERROR_PREFIX}: cannot open ${this.opts.url}: ${describe(error)}`)
      this.scheduleReconnect()
      return
    }
    this.ws = ws
    this.connectTimer = setTimeout(() => {
      if (this.ws === ws && this.state === "connecting") {
        this.opts.log("warn", `no handshake from ${this.opts.url} in ${this.opts.connectTimeoutMs} ms`)
        this.lost(ws)
      }
    }, this.opts.connectTimeoutMs)
    unref(this.connectTimer)
    ws.addEventListener("open", () => {
      if (this.ws !== ws) return
      if (this.connectTimer) clearTimeout(this.connectTimer)
      this.state = "open"
      this.attempt = 0
      this.pingSentAt = null
      this.stats.connects++
      this.opts.log(
        "info",
        `connected to ${this.opts.url}${this.queue.length ? `; sending ${this.queue.length} queued events` : ""}`,
      )
      if (this.droppedThisOutage) {
        this.opts.log("warn", `${this.droppedThisOutage} events were dropped while the queue was full`)
        this.droppedThisOutage = 0
      }
      this.pump()
      for (const wake of this.openWaiters) wake()
      this.openWaiters.clear()
    })
    ws.addEventListener("message", (event: MessageEvent) => {
      if (this.ws === ws) this.receive(event.data)
    })
    ws.addEventListener("error", () => {
      // A "close" event always follows; it does the work.
      if (this.ws === ws && this.state === "connecting") this.lost(ws)
    })
    ws.addEventListener("close", (event: CloseEvent) => {
      if (this.ws !== ws) return
      if (this.state === "open") {
        this.opts.log("warn", `connection to the bridge closed (code ${event.code}); reconnecting`)
      }
      this.lost(ws)
    })
  }

  /** The socket is gone (or given up on): requeue what it did not confirm, then retry. */
  private lost(ws: WebSocket): void {
    if (this.ws !== ws || this.state === "closed") return
    if (this.state === "connecting" && this.attempt === 0) {
      this.opts.log(
        "warn",
        `cannot connect to the bridge at ${this.opts.url} (not running, or it refused the handshake: ` +
          "check GRAPHITI_BRIDGE_TOKEN); chats go on without memory and events wait in the queue while it retries",
      )
    }
    this.ws = null
    if (this.connectTimer) clearTimeout(this.connectTimer)
    try {
      ws.close()
    } catch {
      // already closing
    }
    if (this.inflight) {
      const { message, refusals } = this.inflight
      this.queue.unshift({ message, refusals })
      this.inflight = null
    }
    this.failWaiting()
    this.scheduleReconnect()
  }

  private scheduleReconnect(): void {
    if (this.state === "closed") return
    this.state = "connecting"
    const delay = backoffDelay(this.attempt++, this.opts.backoffInitialMs, this.opts.backoffMaxMs)
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null
      this.connect()
    }, delay)
    unref(this.reconnectTimer)
  }

  private failWaiting(): void {
    const pending = [...this.waiting.values()]
    this.waiting.clear()
    for (const finish of pending) finish(undefined)
  }

  /** Send the next queued event if none is waiting for its ack. */
  private pump(): void {
    if (this.state !== "open" || this.inflight || !this.queue.length) return
    const wait = this.holdUntil - Date.now()
    if (wait > 0) {
      if (!this.retryTimer) {
        this.retryTimer = setTimeout(() => {
          this.retryTimer = null
          this.pump()
        }, wait)
        unref(this.retryTimer)
      }
      return
    }
    const next = this.queue.shift()!
    const id = this.nextId++
    const message = next.message
    this.inflight = { ...next, id }
    this.stats.sent++
    // On failure the event stays in flight and is resent after the reconnect.
    this.write({ ...message, id })
  }

  private write(message: Record<string, unknown>): boolean {
    const ws = this.ws
    if (!ws || this.state !== "open") return false
    try {
      ws.send(encode(message))
      return true
    } catch (error) {
      this.opts.log("error", `${ERROR_PREFIX}: sending ${String(message.type)}: ${describe(error)}`)
      this.lost(ws)
      return false
    }
  }

  private receive(data: unknown): void {
    let reply: Reply
    try {
      const bytes =
        data instanceof ArrayBuffer
          ? new Uint8Array(data)
          : typeof data === "string"
            ? null
            : (data as Uint8Array)
      const decoded = bytes ? decode(bytes) : JSON.parse(data as string)
      if (!decoded || typeof decoded !== "object" || typeof (decoded as Reply).type !== "string") {
        throw new Error("not a message")
      }
      reply = decoded as Reply
    } catch (error) {
      this.opts.log("error", `${ERROR_PREFIX}: unreadable frame from the bridge: ${describe(error)}`)
      return
    }
    const id = typeof reply.id === "number" ? reply.id : null
    if (reply.type === "pong" && id === null) return
    if (id === null) {
      if (reply.type === "ack" && reply.ok === false) {
        this.opts.log("error", `${ERROR_PREFIX}: the bridge refused a message: ${describe(reply.error)}`)
      }
      return
    }
    if (reply.type === "pong") this.pingSentAt = null
    const waiter = this.waiting.get(id)
    if (waiter) {
      waiter(reply)
      return
    }
    const event = this.inflight?.id === id ? this.inflight : undefined
    if (event && reply.type === "ack") {
      this.inflight = null
      const error = reply.error as { retryable?: unknown } | undefined
      if (reply.ok === false && error?.retryable === true && event.refusals + 1 < MAX_REFUSALS) {
        // Overloaded or memory briefly unavailable: the same event goes again first, later.
        this.stats.retried++
        this.queue.unshift({ message: event.message, refusals: event.refusals + 1 })
        this.holdUntil =
          Date.now() + backoffDelay(event.refusals, this.opts.backoffInitialMs, this.opts.backoffMaxMs)
      } else if (reply.ok === false) {
        this.stats.refused++
        this.opts.log(
          "error",
          `${ERROR_PREFIX}: the bridge did not store a ${event.message.type} event: ${describe(reply.error)}`,
        )
      } else {
        this.stats.acked++
      }
      if (this.backlog === 0) {
        for (const wake of this.drainWaiters) wake()
        this.drainWaiters.clear()
      }
      this.pump()
    }
  }

  /** Heartbeat: ping when idle; drop a connection whose ping went unanswered. */
  private beat(): void {
    const ws = this.ws
    if (!ws || this.state !== "open") return
    if (this.pingSentAt !== null) {
      if (Date.now() - this.pingSentAt > this.opts.heartbeatTimeoutMs) {
        this.opts.log(
          "warn",
          `the bridge did not answer a ping in ${this.opts.heartbeatTimeoutMs} ms; reconnecting`,
        )
        this.lost(ws)
      }
      return
    }
    this.pingSentAt = Date.now()
    this.write({ type: "ping", id: this.nextId++ })
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

let partCounter = 0
/**
 * An id for the injected part. OpenCode orders a message's parts by id, so the memory
 * part takes a proper prefix of the first part's id: it sorts right before the person's
 * text (the model reads the context first) and can equal no id OpenCode generates (those
 * all have one length). Without such a part, a fresh id in OpenCode's form.
 */
export function memoryPartId(parts: readonly Part[]): string {
  const first = parts[0]?.id
  if (typeof first === "string" && first.startsWith("prt_") && first.length > 8) return first.slice(0, -1)
  return newPartId()
}

/** A part id in OpenCode's form ("prt_" + time + counter + random). */
export function newPartId(): string {
  partCounter = (partCounter + 1) % 0x1000
  const time = (Date.now() * 0x1000 + partCounter).toString(16).padStart(12, "0").slice(-12)
  const random = Math.random().toString(36).slice(2, 12).padEnd(10, "0")
  return `prt_${time}${random}`
}

/** A Map that forgets its oldest entries past `limit`. */
class Memo<V> {
  private readonly map = new Map<string, V>()
  constructor(private readonly limit: number) {}
  get(key: string): V | undefined {
    return this.map.get(key)
  }
  has(key: string): boolean {
    return this.map.has(key)
  }
  delete(key: string): void {
    this.map.delete(key)
  }
  set(key: string, value: V): void {
    this.map.delete(key)
    this.map.set(key, value)
    if (this.map.size > this.limit) this.map.delete(this.map.keys().next().value as string)
  }
  entries(): IterableIterator<[string, V]> {
    return this.map.entries()
  }
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
  const client = new BridgeClient({
    url: options.url,
    token: options.token,
    maxQueue: options.maxQueue,
    log,
    ...options.client,
  })

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
    if (reported.has(key) || !error.trim()) return
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

  const hooks: Hooks = {
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
        // events of earlier turns still queued go first (waiting at most half the deadline).
        if (client.connected && client.backlog) await client.drained(options.deadlineMs / 2)
        const reply = await client.request(
          { type: "chat:start", query: clip(text, MAX_TEXT), project, session: sessionID },
          deadline - Date.now(),
        )
        if (!reply) return
        if (reply.type !== "context") {
          log("error", `${ERROR_PREFIX} in chat.message: the bridge answered ${describe(reply)}`)
          return
        }
        if (typeof reply.inject !== "string" || !reply.inject) return
        const part: TextPart = {
          id: memoryPartId(output.parts),
          sessionID,
          messageID: messageID ?? "",
          type: "text",
          text: reply.inject,
          synthetic: true,
        }
        output.parts.unshift(part)
      } catch (error) {
        fail("chat.message", error)
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
        // bridge is unreachable), then close.
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
    return createHooks(input, { ...settingsFromEnv(process.env, log), log }).hooks
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
