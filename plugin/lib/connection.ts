/**
 * The socket to the bridge: one WebSocket, opened at start-up and kept open. It reconnects
 * with capped exponential backoff and jitter, drops a connection whose ping goes unanswered
 * or whose handshake hangs, says once per outage why the bridge cannot be used, and matches
 * replies to requests by `id`. A request gets a reply or nothing within its deadline, and
 * nothing at once while the bridge is known to be down (fast-fail).
 *
 * What is sent without waiting for the reply here (an event, whose ack comes back with no
 * request waiting) is its owner's business: the connection hands such replies on, and says
 * when it opened and when it was lost (lib/event-queue.ts).
 */
import { backoffDelay } from "./backoff.ts"
import { outageReport, type Outage, probeHandshake } from "./handshake.ts"
import { describe, ERROR_PREFIX, type Logger } from "./log.ts"
import type { ClientMessage } from "./protocol.ts"
import { Signal, unref, waitFor } from "./signal.ts"
import { decodeFrame, encodeFrame, type Outgoing, type Reply } from "./wire.ts"

export interface ConnectionOptions {
  url: string
  token?: string
  log: Logger
  /** First reconnect delay; doubles per failed attempt up to backoffMaxMs, with jitter. */
  backoffInitialMs: number
  backoffMaxMs: number
  /** A handshake that takes longer than this is abandoned and retried. */
  connectTimeoutMs: number
  /** Idle ping period; a ping unanswered after heartbeatTimeoutMs drops the connection. */
  heartbeatMs: number
  heartbeatTimeoutMs: number
}

/** What the connection tells its owner. */
export interface ConnectionEvents {
  /** The socket opened (said before the requests waiting for it go on). */
  opened(): void
  /** The socket is gone, or was given up on; a reconnect follows. */
  lost(): void
  /** A reply that no request waits for, by the id it answers. */
  reply(id: number, reply: Reply): void
}

export interface ConnectionStats {
  /** Connection attempts, the first one included. */
  attempts: number
  /** Connections opened, the first one included. */
  connects: number
  /** Requests answered at once with nothing because the bridge was known to be down. */
  fastFailed: number
}

type State = "idle" | "connecting" | "open" | "closed"

/** A request while the bridge is down brings the next reconnect forward, at most this often. */
const NUDGE_MS = 1_000

export class Connection {
  readonly stats: ConnectionStats = { attempts: 0, connects: 0, fastFailed: 0 }

  private state: State = "idle"
  private ws: WebSocket | null = null
  private lastId = 0
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
  /** Requests waiting for their reply, by id. */
  private readonly waiting = new Map<number, (reply: Reply | undefined) => void>()
  private readonly openSignal = new Signal()
  /** Requests waiting for the connection: woken when it opens and when an attempt fails. */
  private readonly attemptSignal = new Signal()

  constructor(
    private readonly options: ConnectionOptions,
    private readonly events: ConnectionEvents,
  ) {}

  /** True while the socket is open. */
  get connected(): boolean {
    return this.state === "open"
  }

  /** True while the bridge is known to be down: the last attempt failed, none opened since. */
  get unreachable(): boolean {
    return this.down
  }

  /** Open the connection (and keep it open until close()). Never throws. */
  start(): void {
    if (this.state !== "idle") return
    this.connect()
    this.heartbeat = setInterval(() => this.beat(), this.options.heartbeatMs)
    unref(this.heartbeat)
  }

  /** Close the connection for good; requests still waiting get nothing. */
  close(): void {
    if (this.state === "closed") return
    this.state = "closed"
    for (const timer of [this.reconnectTimer, this.connectTimer]) if (timer) clearTimeout(timer)
    if (this.heartbeat) clearInterval(this.heartbeat)
    const ws = this.ws
    this.ws = null
    try {
      ws?.close(1000, "plugin closed")
    } catch (error) {
      this.options.log("debug", `closing the socket: ${describe(error)}`)
    }
    this.failWaiting()
    this.openSignal.wake()
    this.attemptSignal.wake()
  }

  /** A fresh message id (requests, events and pings share one sequence). */
  nextId(): number {
    return ++this.lastId
  }

  /** Write one message on the open socket; false if there is none or the write failed. */
  write(message: ClientMessage): boolean {
    const ws = this.ws
    if (!ws || this.state !== "open") return false
    try {
      ws.send(encodeFrame(message))
      return true
    } catch (error) {
      this.options.log("error", `${ERROR_PREFIX}: sending ${message.type}: ${describe(error)}`)
      this.lost(ws)
      return false
    }
  }

  /**
   * Send a request and wait for its reply at most `deadlineMs`, counting the time spent
   * waiting for the connection to open. Undefined when the deadline passed, the bridge is
   * unreachable or the connection dropped meanwhile; at once while the bridge is known to
   * be down (fast-fail), which also brings the next reconnect attempt forward.
   */
  async request(message: Outgoing, deadlineMs: number): Promise<Reply | undefined> {
    if (this.state === "closed" || this.state === "idle" || deadlineMs <= 0) return undefined
    if (this.down) {
      this.fastFail(message.type)
      return undefined
    }
    const deadline = Date.now() + deadlineMs
    if (this.state !== "open") {
      await waitFor([this.attemptSignal], deadlineMs)
      if (!this.connected) {
        // The attempt under way failed: nothing, without waiting out the deadline.
        if (this.down) this.fastFail(message.type)
        return undefined
      }
    }
    const id = this.nextId()
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

  /** Wait (at most timeoutMs) until the socket is open; true if it is. */
  async opened(timeoutMs: number): Promise<boolean> {
    if (this.state === "open") return true
    await waitFor([this.openSignal], timeoutMs)
    return this.connected
  }

  // -- internals ----------------------------------------------------------------------

  private get headers(): Record<string, string> {
    return this.options.token ? { Authorization: `Bearer ${this.options.token}` } : {}
  }

  private connect(): void {
    if (this.state === "closed") return
    const { url, log } = this.options
    this.state = "connecting"
    this.lastAttemptAt = Date.now()
    this.stats.attempts++
    let ws: WebSocket
    try {
      // Bun's WebSocket takes handshake headers as a second argument; the token never
      // goes into the URL.
      ws = new WebSocket(url, { headers: this.headers })
      ws.binaryType = "arraybuffer"
    } catch (error) {
      log("error", `${ERROR_PREFIX}: cannot open ${url}: ${describe(error)}`)
      this.down = true
      this.scheduleReconnect()
      return
    }
    this.ws = ws
    this.connectTimer = setTimeout(() => {
      if (this.ws === ws && this.state === "connecting") {
        log("warn", `no handshake from ${url} in ${this.options.connectTimeoutMs} ms`)
        this.lost(ws)
      }
    }, this.options.connectTimeoutMs)
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
      this.events.opened()
      this.openSignal.wake()
      this.attemptSignal.wake()
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
      if (this.state === "open")
        log("warn", `connection to the bridge closed (code ${event.code}); reconnecting`)
      this.lost(ws)
    })
  }

  /** The socket is gone (or given up on): tell the owner, fail the requests, then retry. */
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
    this.events.lost()
    this.failWaiting()
    this.attemptSignal.wake() // requests waiting for the connection give up now
    this.scheduleReconnect()
    if (handshakeFailed) void this.diagnose()
  }

  /** Find out why a handshake failed, and say so once per outage and kind. */
  private async diagnose(): Promise<void> {
    if (this.probing) return
    this.probing = true
    let outage: Outage
    try {
      outage = await probeHandshake(this.options.url, this.headers, this.options.connectTimeoutMs)
    } finally {
      this.probing = false
    }
    if (!this.down || this.state === "closed" || outage === this.reported) return
    this.reported = outage
    const { level, message } = outageReport(outage, this.options.url, Boolean(this.options.token))
    this.options.log(level, message)
  }

  /** A request while the bridge is down: nothing, at once; and try to reconnect soon. */
  private fastFail(type: string): void {
    this.stats.fastFailed++
    if (!this.fastFailLogged) {
      this.fastFailLogged = true
      this.options.log(
        "info",
        `the bridge is unreachable: ${type} goes on without memory at once (fast-fail) until it is back`,
      )
    }
    const now = Date.now()
    if (
      this.reconnectTimer &&
      this.nextAttemptAt - now > this.options.backoffInitialMs &&
      now - this.lastAttemptAt >= NUDGE_MS
    ) {
      clearTimeout(this.reconnectTimer)
      this.arm(0)
    }
  }

  private scheduleReconnect(): void {
    if (this.state === "closed") return
    this.state = "connecting"
    this.arm(backoffDelay(this.attempt++, this.options.backoffInitialMs, this.options.backoffMaxMs))
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

  private receive(data: unknown): void {
    let reply: Reply
    try {
      reply = decodeFrame(data)
    } catch (error) {
      this.options.log("error", `${ERROR_PREFIX}: unreadable frame from the bridge: ${describe(error)}`)
      return
    }
    const id = typeof reply.id === "number" ? reply.id : null
    if (reply.type === "pong" && id === null) return
    if (id === null) {
      if (reply.type === "ack" && reply.ok === false) {
        this.options.log("error", `${ERROR_PREFIX}: the bridge refused a message: ${describe(reply.error)}`)
      }
      return
    }
    if (reply.type === "pong") this.pingSentAt = null
    const waiter = this.waiting.get(id)
    if (waiter) waiter(reply)
    else this.events.reply(id, reply)
  }

  /** Heartbeat: ping when idle; drop a connection whose ping went unanswered. */
  private beat(): void {
    const ws = this.ws
    if (!ws || this.state !== "open") return
    if (this.pingSentAt !== null) {
      if (Date.now() - this.pingSentAt > this.options.heartbeatTimeoutMs) {
        this.options.log(
          "warn",
          `the bridge did not answer a ping in ${this.options.heartbeatTimeoutMs} ms; reconnecting`,
        )
        this.lost(ws)
      }
      return
    }
    this.pingSentAt = Date.now()
    this.write({ type: "ping", id: this.nextId() })
  }
}
