/**
 * graphiti-memory: the OpenCode plugin of graphiti-bridge.
 *
 * One WebSocket to the bridge, opened at start-up and kept open; every message is a
 * MessagePack map in a binary frame (docs/protocol.md). OpenCode's hooks map onto the
 * bridge's events:
 *
 *   chat.message (the user's text)     -> chat:start; the reply's `inject` is added to the
 *                                          message as a synthetic text part
 *   event file.edited                  -> file:write
 *   event session.error                -> error
 *   event message.updated (assistant,
 *         completed)                   -> completion (tokens, duration); the steps of a
 *                                          task that end in tool calls add up into the
 *                                          completion of the step that finishes it
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
import type { AssistantMessage, Event, Part, TextPart } from "@opencode-ai/sdk"
import { basename } from "node:path"

export const ERROR_PREFIX = "Memory plugin error"
export const SERVICE = "graphiti-memory"

export const DEFAULT_URL = "ws://127.0.0.1:8765"
export const DEFAULT_DEADLINE_MS = 300
export const DEFAULT_QUEUE = 1000

/** Longest text the protocol accepts in `query`, `message` and `task`. */
const MAX_TEXT = 65_536
/** How many characters of the user's prompt name a completed task. */
const TASK_CHARS = 500
/** How many message ids and prompts the plugin remembers (oldest forgotten first). */
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
}

function clip(text: string, limit: number): string {
  return text.length <= limit ? text : `${text.slice(0, limit - 1)}…`
}

function errorText(error: unknown): string {
  if (!error || typeof error !== "object") return ""
  const { name, data } = error as { name?: unknown; data?: { message?: unknown } }
  const message = typeof data?.message === "string" ? data.message.trim() : ""
  const label = typeof name === "string" ? name : ""
  return [label, message].filter(Boolean).join(": ")
}

/** The hooks and the client behind them (the client is exposed for tests and dispose). */
export function createHooks(
  input: Pick<PluginInput, "worktree" | "directory">,
  options: HookOptions,
): { hooks: Hooks; client: BridgeClient; project: string } {
  const log = safeLogger(options.log)
  const project = projectName(input, options.project)
  const client = new BridgeClient({
    url: options.url,
    token: options.token,
    maxQueue: options.maxQueue,
    log,
    ...options.client,
  })
  /** Prompt text by user message id, and the latest prompt of each session. */
  const prompts = new Memo<string>(MEMO_SIZE)
  const lastPrompt = new Memo<string>(MEMO_SIZE)
  /** Assistant messages already reported as completions. */
  const completed = new Memo<true>(MEMO_SIZE)

  const fail = (where: string, error: unknown): void => {
    log("error", `${ERROR_PREFIX} in ${where}: ${describe(error)}`)
  }

  /** Steps of a task that ended in tool calls, by the prompt's message id. */
  const steps = new Memo<{ tokens: number; started: number }>(MEMO_SIZE)

  /**
   * A finished assistant message. A message that ended in tool calls is one step of a task:
   * its tokens and start are carried over to the message that finishes the task, which
   * reports one completion for the whole prompt.
   */
  const onCompleted = (info: AssistantMessage): void => {
    const finished = info.time?.completed
    if (!finished || completed.has(info.id)) return
    completed.set(info.id, true)
    if (info.error) return // reported by session.error
    const tokens = info.tokens as (AssistantMessage["tokens"] & { total?: number }) | undefined
    const used =
      typeof tokens?.total === "number"
        ? tokens.total
        : (tokens?.input ?? 0) + (tokens?.output ?? 0) + (tokens?.reasoning ?? 0)
    const before = steps.get(info.parentID)
    const total = (before?.tokens ?? 0) + (Number.isFinite(used) ? Math.max(0, used) : 0)
    const started = Math.min(before?.started ?? info.time.created, info.time.created)
    if (info.finish === "tool-calls" || info.finish === "tool_calls") {
      steps.set(info.parentID, { tokens: total, started })
      return
    }
    steps.delete(info.parentID)
    const prompt = prompts.get(info.parentID) ?? lastPrompt.get(info.sessionID)
    const task = prompt
      ? clip(prompt, TASK_CHARS)
      : `reply from ${info.providerID}/${info.modelID} in session ${info.sessionID}`
    client.send({
      type: "completion",
      task,
      tokens: Math.round(total),
      duration_ms: Math.max(0, finished - started),
      project,
      session: info.sessionID,
    })
  }

  const hooks: Hooks = {
    "chat.message": async (hookInput, output) => {
      try {
        const text = userText(output.parts)
        if (!text) return
        const messageID = output.message?.id ?? hookInput.messageID
        if (messageID) prompts.set(messageID, text)
        lastPrompt.set(hookInput.sessionID, text)
        const reply = await client.request(
          { type: "chat:start", query: clip(text, MAX_TEXT), project, session: hookInput.sessionID },
          options.deadlineMs,
        )
        if (!reply) return
        if (reply.type !== "context") {
          log("error", `${ERROR_PREFIX} in chat.message: the bridge answered ${describe(reply)}`)
          return
        }
        if (typeof reply.inject !== "string" || !reply.inject) return
        const part: TextPart = {
          id: memoryPartId(output.parts),
          sessionID: hookInput.sessionID,
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

    event: async (hookInput: { event: Event }) => {
      const event = hookInput?.event
      try {
        switch (event?.type) {
          case "file.edited": {
            const path = event.properties?.file
            if (typeof path === "string" && path) {
              client.send({ type: "file:write", path: clip(path, 4096), project })
            }
            return
          }
          case "session.error": {
            const { error, sessionID } = event.properties ?? {}
            if ((error as { name?: string } | undefined)?.name === "MessageAbortedError") return
            const message = errorText(error)
            if (!message) return
            client.send({ type: "error", message: clip(message, MAX_TEXT), project, session: sessionID })
            return
          }
          case "message.updated": {
            const info = event.properties?.info
            if (info?.role === "assistant") onCompleted(info)
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
