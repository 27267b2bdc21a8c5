/**
 * The bridge client: one WebSocket, opened at start-up and kept open; every message a
 * MessagePack map in a binary frame (docs/protocol.md).
 *
 * Events (file:write, error, completion) go out one at a time, each after the previous one's
 * ack: the bridge handles a connection's messages concurrently, so this is what keeps them
 * in order. Until acknowledged they wait in a bounded queue, on disk when a store is given
 * (lib/durable-queue.ts), and an event sent again keeps its `episode_id`, so the bridge
 * stores it once. Requests (chat:start, query) are never queued: they get a reply or
 * nothing within their deadline, and nothing at once while the bridge is known to be down.
 */
import { decode, encode } from "@msgpack/msgpack"
import { describe, ERROR_PREFIX, type Logger, safeLogger } from "./log.ts"

/** A message to the bridge (the client adds `id`). */
export type Outgoing = { type: string } & Record<string, unknown>
/** A reply from the bridge. */
export type Reply = { type: string; id?: unknown } & Record<string, unknown>
/** An event as queued: stamped with the time it happened and the id the bridge stores it under. */
export type Stamped = Outgoing & { at: number; episode_id: string }

/** Where events wait until the bridge acknowledges them (lib/durable-queue.ts's QueueFile). */
export interface EventStore {
  /** Events an earlier run left unacknowledged, oldest first. */
  readonly recovered: readonly Stamped[]
  add(event: Stamped): void
  done(episodeId: string): void
  close(): void
}

export interface ClientOptions {
  url: string
  token?: string
  /** Most events held at once, queued or sent and not yet acknowledged. */
  maxQueue: number
  log: Logger
  /** Keeps unacknowledged events across restarts; without one they live in memory only. */
  store?: EventStore
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
  /** Events dropped because the queue was full (the oldest waiting one goes). */
  dropped: number
  /** Events an earlier run left unacknowledged, queued again at start-up. */
  recovered: number
  /** Requests answered at once with nothing because the bridge was known to be down. */
  fastFailed: number
  /** Connection attempts, the first one included. */
  attempts: number
  /** Connections opened, the first one included. */
  connects: number
}

/** Why the bridge cannot be used: not reachable, refused the token, or another HTTP answer. */
export type Outage = "down" | "token" | `http ${number}`

type State = "idle" | "connecting" | "open" | "closed"
/** Told how an event ended: the bridge's ack (stored, or refused for good), or undefined
 * when it was dropped from a full queue. */
export type Settled = (reply: Reply | undefined) => void
type Queued = { message: Stamped; refusals: number; onSettled?: Settled }

/** Refusals an event may get for a retryable reason before it is given up. */
export const MAX_REFUSALS = 6
/** A request while the bridge is down brings the next reconnect forward, at most this often. */
const NUDGE_MS = 1_000

/** Reconnect delay for a 0-based attempt: capped exponential, with jitter in [d/2, d]. */
export function backoffDelay(attempt: number, initialMs: number, maxMs: number): number {
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30))
  return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2)
}

/** Call an event's listener; what it throws is no concern of the queue. */
function tell(listener: Settled | undefined, reply: Reply | undefined): void {
  try {
    listener?.(reply)
  } catch {
    // the listener's own failure
  }
}

function unref(timer: ReturnType<typeof setTimeout>): void {
  // A pending reconnect or heartbeat must never keep OpenCode's process alive.
  ;(timer as { unref?: () => void }).unref?.()
}

/**
 * Why a handshake failed, asked with a plain HTTP GET of the same URL and headers: the
 * WebSocket API does not show a refused handshake's status (the bridge answers the GET as
 * it would the handshake: 401 for a wrong token, 403 for a refused origin). "down" when
 * nothing answers.
 */
export async function probeHandshake(
  url: string,
  headers: Record<string, string>,
  timeoutMs: number,
): Promise<Outage> {
  const target = new URL(url)
  target.protocol = target.protocol === "wss:" ? "https:" : "http:"
  try {
    const response = await fetch(target, { headers, signal: AbortSignal.timeout(timeoutMs) })
    await response.body?.cancel()
    return response.status === 401 || response.status === 403 ? "token" : `http ${response.status}`
  } catch {
    return "down"
  }
}

export class BridgeClient {
  readonly stats: ClientStats = {
    sent: 0,
    acked: 0,
    refused: 0,
    retried: 0,
    dropped: 0,
    recovered: 0,
    fastFailed: 0,
    attempts: 0,
    connects: 0,
  }

  private readonly opts: Required<Omit<ClientOptions, "token" | "store">> & { token?: string }
  private readonly store?: EventStore
  private state: State = "idle"
  private ws: WebSocket | null = null
  private nextId = 1
  private attempt = 0
  /** The last connection attempt failed, or the connection closed, and none opened since. */
  private down = false
  /** The outage last reported, so each kind is logged once per outage. */
  private reported: Outage | null = null
  private probing = false
  private fastFailLogged = false
  private lastAttemptAt = 0
  private nextAttemptAt = 0
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
  /** Requests waiting for the connection: woken when it opens and when an attempt fails. */
  private attemptWaiters = new Set<() => void>()
  private drainWaiters = new Set<() => void>()
  /** Waiters that give up when the connection is lost or an attempt fails. */
  private lostWaiters = new Set<() => void>()

  constructor(options: ClientOptions) {
    const { store, ...rest } = options
    this.opts = {
      backoffInitialMs: 250,
      backoffMaxMs: 30_000,
      connectTimeoutMs: 5_000,
      heartbeatMs: 15_000,
      heartbeatTimeoutMs: 10_000,
      ...rest,
      log: safeLogger(options.log),
    }
    this.store = store
    for (const message of store?.recovered ?? []) this.queue.push({ message, refusals: 0 })
    this.stats.recovered = this.queue.length
  }

  /** True while the socket is open. */
  get connected(): boolean {
    return this.state === "open"
  }

  /** True while the bridge is known to be down: the last attempt failed, none opened since. */
  get unreachable(): boolean {
    return this.down
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

  /** Close the connection for good; events not yet acknowledged stay in the store. */
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
    this.store?.close()
    this.failWaiting()
    this.wake(this.openWaiters)
    this.wake(this.attemptWaiters)
    this.wake(this.drainWaiters)
    this.wake(this.lostWaiters)
  }

  /**
   * Send an event that the bridge acknowledges (file:write, error, completion). Events go
   * out one at a time in the order given, each once the previous one is acknowledged, so
   * the bridge stores them in that order; an event whose socket died before its ack is
   * resent first after the reconnect. Never throws; a full queue drops its oldest waiting
   * event, counts it and warns once per outage. `onSettled` hears how this run of the
   * plugin saw the event end (an event replayed after a restart tells no one).
   */
  send(message: Outgoing, onSettled?: Settled): void {
    if (this.state === "closed" || this.opts.maxQueue <= 0) {
      this.stats.dropped++
      tell(onSettled, undefined)
      return
    }
    // Stamped now: a replay keeps the event's own time, and its id makes a resend of an
    // event whose ack was lost harmless (the bridge stores an id once).
    const stamped: Stamped = { at: Date.now() / 1000, episode_id: crypto.randomUUID(), ...message }
    while (this.backlog >= this.opts.maxQueue && this.queue.length) this.drop(this.queue.shift()!)
    this.store?.add(stamped)
    this.queue.push({ message: stamped, refusals: 0, onSettled })
    this.pump()
  }

  /**
   * Send a request and wait for its reply at most `deadlineMs`, counting the time spent
   * waiting for the connection to open. Undefined when the deadline passed, the bridge is
   * unreachable or the connection dropped meanwhile; at once while the bridge is known to
   * be down (fast-fail), which also brings the next reconnect attempt forward. Requests are
   * never queued.
   */
  async request(message: Outgoing, deadlineMs: number): Promise<Reply | undefined> {
    if (this.state === "closed" || this.state === "idle" || deadlineMs <= 0) return undefined
    if (this.down) {
      this.fastFail(message.type)
      return undefined
    }
    const deadline = Date.now() + deadlineMs
    if (this.state !== "open") {
      await this.waitFor([this.attemptWaiters], deadlineMs)
      if (!this.connected) {
        // The attempt under way failed: nothing, without waiting out the deadline.
        if (this.down) this.fastFail(message.type)
        return undefined
      }
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

  /**
   * Wait (at most timeoutMs) until every event was acknowledged; true if it was. With
   * `whileReachable`, give up at once when the bridge is (or becomes) known to be down.
   */
  async drained(timeoutMs: number, whileReachable = false): Promise<boolean> {
    if (this.backlog === 0) return true
    if (whileReachable && this.down) return false
    await this.waitFor(
      whileReachable ? [this.drainWaiters, this.lostWaiters] : [this.drainWaiters],
      timeoutMs,
    )
    return this.backlog === 0
  }

  /** Wait (at most timeoutMs) until the socket is open; true if it is. */
  async opened(timeoutMs: number): Promise<boolean> {
    if (this.state === "open") return true
    await this.waitFor([this.openWaiters], timeoutMs)
    return this.connected
  }

  // -- internals ----------------------------------------------------------------------

  /** Wait until any of the sets is woken, or timeoutMs passed. */
  private async waitFor(sets: Set<() => void>[], timeoutMs: number): Promise<void> {
    await new Promise<void>((resolve) => {
      const wake = (): void => {
        clearTimeout(timer)
        for (const waiters of sets) waiters.delete(wake)
        resolve()
      }
      const timer = setTimeout(wake, Math.max(0, timeoutMs))
      for (const waiters of sets) waiters.add(wake)
    })
  }

  private wake(waiters: Set<() => void>): void {
    for (const wake of [...waiters]) wake()
    waiters.clear()
  }

  private get headers(): Record<string, string> {
    return this.opts.token ? { Authorization: `Bearer ${this.opts.token}` } : {}
  }

  private connect(): void {
    if (this.state === "closed") return
    this.state = "connecting"
    this.lastAttemptAt = Date.now()
    this.stats.attempts++
    let ws: WebSocket
    try {
      // Bun's WebSocket takes handshake headers as a second argument; the token never
      // goes into the URL.
      ws = new WebSocket(this.opts.url, { headers: this.headers })
      ws.binaryType = "arraybuffer"
    } catch (error) {
      this.opts.log("error", `${ERROR_PREFIX}: cannot open ${this.opts.url}: ${describe(error)}`)
      this.down = true
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
      this.down = false
      this.reported = null
      this.fastFailLogged = false
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
      this.wake(this.openWaiters)
      this.wake(this.attemptWaiters)
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
    const handshakeFailed = this.state === "connecting"
    this.ws = null
    this.down = true
    if (this.connectTimer) clearTimeout(this.connectTimer)
    try {
      ws.close()
    } catch {
      // already closing
    }
    if (this.inflight) {
      const { message, refusals, onSettled } = this.inflight
      this.queue.unshift({ message, refusals, onSettled })
      this.inflight = null
    }
    this.failWaiting()
    this.wake(this.attemptWaiters) // requests waiting for the connection give up now
    this.wake(this.lostWaiters)
    this.scheduleReconnect()
    if (handshakeFailed) void this.diagnose()
  }

  /** Find out why a handshake failed, and say so once per outage and kind. */
  private async diagnose(): Promise<void> {
    if (this.probing) return
    this.probing = true
    let outage: Outage
    try {
      outage = await probeHandshake(this.opts.url, this.headers, this.opts.connectTimeoutMs)
    } finally {
      this.probing = false
    }
    if (!this.down || this.state === "closed" || outage === this.reported) return
    this.reported = outage
    const url = this.opts.url
    const meanwhile = "chats go on without memory and events wait in the queue"
    if (outage === "token") {
      this.opts.log(
        "error",
        `the bridge at ${url} refused the token: GRAPHITI_BRIDGE_TOKEN is ` +
          `${this.opts.token ? "not the bridge's BRIDGE_TOKEN" : "not set, and the bridge wants one"}; ` +
          `${meanwhile} until it matches`,
      )
    } else if (outage === "down") {
      this.opts.log(
        "warn",
        `cannot connect to the bridge at ${url} (is it running?); ${meanwhile} while it retries`,
      )
    } else {
      this.opts.log(
        "warn",
        `the bridge at ${url} refused the connection (${outage.replace("http", "HTTP")}); ${meanwhile} while it retries`,
      )
    }
  }

  /** A request while the bridge is down: nothing, at once; and try to reconnect soon. */
  private fastFail(type: string): void {
    this.stats.fastFailed++
    if (!this.fastFailLogged) {
      this.fastFailLogged = true
      this.opts.log(
        "info",
        `the bridge is unreachable: ${type} goes on without memory at once (fast-fail) until it is back`,
      )
    }
    const now = Date.now()
    if (
      this.reconnectTimer &&
      this.nextAttemptAt - now > this.opts.backoffInitialMs &&
      now - this.lastAttemptAt >= NUDGE_MS
    ) {
      clearTimeout(this.reconnectTimer)
      this.arm(0)
    }
  }

  private scheduleReconnect(): void {
    if (this.state === "closed") return
    this.state = "connecting"
    this.arm(backoffDelay(this.attempt++, this.opts.backoffInitialMs, this.opts.backoffMaxMs))
  }

  private arm(delay: number): void {
    this.nextAttemptAt = Date.now() + delay
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

  /** The queue is full: the oldest waiting event goes (warned once per outage). */
  private drop(event: Queued): void {
    this.stats.dropped++
    this.droppedThisOutage++
    this.store?.done(event.message.episode_id)
    tell(event.onSettled, undefined)
    if (this.droppedThisOutage === 1) {
      this.opts.log(
        "warn",
        `event queue full (${this.opts.maxQueue}); dropping the oldest events until the bridge catches up`,
      )
    }
  }

  /** The bridge settled an event (stored it, or refused it for good). */
  private settled(event: Queued, reply: Reply): void {
    this.store?.done(event.message.episode_id)
    tell(event.onSettled, reply)
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
    this.inflight = { ...next, id }
    this.stats.sent++
    // On failure the event stays in flight and is resent after the reconnect.
    this.write({ ...next.message, id })
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
        const { message, refusals, onSettled } = event
        this.queue.unshift({ message, refusals: refusals + 1, onSettled })
        this.holdUntil =
          Date.now() + backoffDelay(event.refusals, this.opts.backoffInitialMs, this.opts.backoffMaxMs)
      } else if (reply.ok === false) {
        this.stats.refused++
        this.settled(event, reply)
        this.opts.log(
          "error",
          `${ERROR_PREFIX}: the bridge did not store a ${event.message.type} event: ${describe(reply.error)}`,
        )
      } else {
        this.stats.acked++
        this.settled(event, reply)
      }
      if (this.backlog === 0) this.wake(this.drainWaiters)
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
