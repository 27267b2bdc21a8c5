/**
 * The bridge client: the socket (lib/connection.ts) and the ordered event queue behind it
 * (lib/event-queue.ts), as the plugin's hooks and its tool use them. Events are
 * acknowledged and kept until then; requests (chat:start, query, forget) get a reply or
 * nothing within their deadline, and are never queued.
 */
import { Connection, type ConnectionStats } from "./connection.ts"
import { type EventQueueStats, EventQueue, type EventStore, type Settled } from "./event-queue.ts"
import { type Logger, safeLogger } from "./log.ts"
import type { Outgoing, OutgoingEvent, Reply } from "./wire.ts"

export { backoffDelay } from "./backoff.ts"
export { type EventStore, MAX_REFUSALS, type Settled } from "./event-queue.ts"
export type { Outgoing, OutgoingEvent, Reply, StampedEvent } from "./wire.ts"

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

export type ClientStats = EventQueueStats & ConnectionStats

export class BridgeClient {
  private readonly connection: Connection
  private readonly events: EventQueue

  constructor(options: ClientOptions) {
    const { store, maxQueue, ...rest } = options
    const settings = {
      backoffInitialMs: 250,
      backoffMaxMs: 30_000,
      connectTimeoutMs: 5_000,
      heartbeatMs: 15_000,
      heartbeatTimeoutMs: 10_000,
      ...rest,
      log: safeLogger(options.log),
    }
    const { log, url } = settings
    this.connection = new Connection(settings, {
      opened: () => {
        const waiting = this.events.waiting
        log("info", `connected to ${url}${waiting ? `; sending ${waiting} queued events` : ""}`)
        this.events.resume()
      },
      lost: () => this.events.lost(),
      reply: (id, reply) => this.events.acknowledge(id, reply),
    })
    this.events = new EventQueue(this.connection, { ...settings, maxQueue, store })
  }

  /** The counts of both halves: what the queue sent and settled, and how the socket fared. */
  get stats(): ClientStats {
    return { ...this.events.stats, ...this.connection.stats }
  }

  /** True while the socket is open. */
  get connected(): boolean {
    return this.connection.connected
  }

  /** True while the bridge is known to be down: the last attempt failed, none opened since. */
  get unreachable(): boolean {
    return this.connection.unreachable
  }

  /** Events queued or sent and not yet acknowledged. */
  get backlog(): number {
    return this.events.backlog
  }

  /** Open the connection (and keep it open until close()). Never throws. */
  start(): void {
    this.connection.start()
  }

  /** Close the connection for good; events not yet acknowledged stay in the store. */
  close(): void {
    this.connection.close()
    this.events.close()
  }

  /** Send an event that the bridge acknowledges, in order (see EventQueue.send). */
  send(message: OutgoingEvent, onSettled?: Settled): void {
    this.events.send(message, onSettled)
  }

  /** Send a request; its reply within `deadlineMs`, or undefined (see Connection.request). */
  async request(message: Outgoing, deadlineMs: number): Promise<Reply | undefined> {
    return await this.connection.request(message, deadlineMs)
  }

  /**
   * Wait (at most timeoutMs) until every event was acknowledged; true if it was. With
   * `whileReachable`, give up at once when the bridge is (or becomes) known to be down.
   */
  async drained(timeoutMs: number, whileReachable = false): Promise<boolean> {
    return await this.events.drained(timeoutMs, whileReachable)
  }

  /** Wait (at most timeoutMs) until the socket is open; true if it is. */
  async opened(timeoutMs: number): Promise<boolean> {
    return await this.connection.opened(timeoutMs)
  }
}
