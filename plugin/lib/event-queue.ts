/**
 * The ordered event queue: events (file:write, error, completion, note) go to the bridge
 * one at a time, each after the previous one's ack. The bridge handles a connection's
 * messages concurrently, so this is what keeps them in order.
 *
 * Until acknowledged an event waits here, in a bounded queue kept on disk when a store is
 * given (lib/durable-queue.ts), and is sent again after a reconnect with the same
 * `episode_id`, so the bridge stores it once. Refusals the protocol marks retryable
 * (overloaded, memory_unavailable) are retried with backoff; past the bound the oldest
 * waiting event is dropped, with a warning once per outage.
 */
import { backoffDelay } from "./backoff.ts"
import { describe, ERROR_PREFIX, type Logger } from "./log.ts"
import type { Ack, ClientMessage } from "./protocol.ts"
import { Signal, unref, waitFor } from "./signal.ts"
import type { OutgoingEvent, Reply, StampedEvent } from "./wire.ts"

/** Where events wait until the bridge acknowledges them (lib/durable-queue.ts's QueueFile). */
export interface EventStore {
  /** Events an earlier run left unacknowledged, oldest first. */
  readonly recovered: readonly StampedEvent[]
  add(event: StampedEvent): void
  done(episodeId: string): void
  close(): void
}

/** The socket as the queue uses it (lib/connection.ts's Connection). */
export interface Transport {
  readonly connected: boolean
  readonly unreachable: boolean
  nextId(): number
  write(message: ClientMessage): boolean
}

/**
 * Told how an event ended: the bridge's ack (stored, or refused for good), or undefined
 * when it was dropped from a full queue.
 */
export type Settled = (ack: Ack | undefined) => void

export interface EventQueueOptions {
  /** Most events held at once, queued or sent and not yet acknowledged. */
  maxQueue: number
  log: Logger
  /** Keeps unacknowledged events across restarts; without one they live in memory only. */
  store?: EventStore
  /** First delay before an event refused for a retryable reason goes again; doubles per refusal. */
  backoffInitialMs: number
  backoffMaxMs: number
}

export interface EventQueueStats {
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
}

/** Refusals an event may get for a retryable reason before it is given up. */
export const MAX_REFUSALS = 6

type Queued = { message: StampedEvent; refusals: number; onSettled?: Settled }

/** Call an event's listener; what it throws is no concern of the queue. */
function tell(listener: Settled | undefined, ack: Ack | undefined): void {
  try {
    listener?.(ack)
  } catch {
    // the listener's own failure
  }
}

export class EventQueue {
  readonly stats: EventQueueStats = { sent: 0, acked: 0, refused: 0, retried: 0, dropped: 0, recovered: 0 }

  private closed = false
  /** Events waiting to be sent, oldest first, with the refusals each has had. */
  private queue: Queued[] = []
  /** The event sent on the current socket and not yet acknowledged, with its id. */
  private inflight: (Queued & { id: number }) | null = null
  /** After a retryable refusal, nothing is sent before this time (ms since the epoch). */
  private holdUntil = 0
  private retryTimer: ReturnType<typeof setTimeout> | null = null
  private droppedThisOutage = 0
  private readonly drainSignal = new Signal()
  /** Woken when the connection is lost: waits that need a reachable bridge give up. */
  private readonly lostSignal = new Signal()

  constructor(
    private readonly transport: Transport,
    private readonly options: EventQueueOptions,
  ) {
    for (const message of options.store?.recovered ?? []) this.queue.push({ message, refusals: 0 })
    this.stats.recovered = this.queue.length
  }

  /** Events queued or sent and not yet acknowledged. */
  get backlog(): number {
    return this.queue.length + (this.inflight ? 1 : 0)
  }

  /** Events waiting to be sent (not the one in flight). */
  get waiting(): number {
    return this.queue.length
  }

  /**
   * Queue an event. Events go out one at a time in the order given, each once the previous
   * one is acknowledged; an event whose socket died before its ack is resent first after
   * the reconnect. Never throws; a full queue drops its oldest waiting event, counts it and
   * warns once per outage. `onSettled` hears how this run of the plugin saw the event end
   * (an event replayed after a restart tells no one).
   */
  send(message: OutgoingEvent, onSettled?: Settled): void {
    if (this.closed || this.options.maxQueue <= 0) {
      this.stats.dropped++
      tell(onSettled, undefined)
      return
    }
    // Stamped now: a replay keeps the event's own time, and its id makes a resend of an
    // event whose ack was lost harmless (the bridge stores an id once).
    const stamped: StampedEvent = {
      ...message,
      at: message.at ?? Date.now() / 1000,
      episode_id: message.episode_id ?? crypto.randomUUID(),
    }
    while (this.backlog >= this.options.maxQueue && this.queue.length) this.drop(this.queue.shift()!)
    this.options.store?.add(stamped)
    this.queue.push({ message: stamped, refusals: 0, onSettled })
    this.pump()
  }

  /** The connection opened: say what was dropped meanwhile, and send what waits. */
  resume(): void {
    if (this.droppedThisOutage) {
      this.options.log("warn", `${this.droppedThisOutage} events were dropped while the queue was full`)
      this.droppedThisOutage = 0
    }
    this.pump()
  }

  /** The connection was lost: the event in flight goes first again after the reconnect. */
  lost(): void {
    if (this.inflight) {
      const { message, refusals, onSettled } = this.inflight
      this.queue.unshift({ message, refusals, onSettled })
      this.inflight = null
    }
    this.lostSignal.wake()
  }

  /** A reply no request waited for: the ack of the event in flight, if it is that. */
  acknowledge(id: number, reply: Reply): void {
    const event = this.inflight?.id === id ? this.inflight : undefined
    if (!event || reply.type !== "ack") return
    this.inflight = null
    const { log, backoffInitialMs, backoffMaxMs } = this.options
    if (reply.ok === false && reply.error?.retryable === true && event.refusals + 1 < MAX_REFUSALS) {
      // Overloaded or memory briefly unavailable: the same event goes again first, later.
      this.stats.retried++
      const { message, refusals, onSettled } = event
      this.queue.unshift({ message, refusals: refusals + 1, onSettled })
      this.holdUntil = Date.now() + backoffDelay(event.refusals, backoffInitialMs, backoffMaxMs)
    } else if (reply.ok === false) {
      this.stats.refused++
      this.settled(event, reply)
      log(
        "error",
        `${ERROR_PREFIX}: the bridge did not store a ${event.message.type} event: ${describe(reply.error)}`,
      )
    } else {
      this.stats.acked++
      this.settled(event, reply)
    }
    if (this.backlog === 0) this.drainSignal.wake()
    this.pump()
  }

  /**
   * Wait (at most timeoutMs) until every event was acknowledged; true if it was. With
   * `whileReachable`, give up at once when the bridge is (or becomes) known to be down.
   */
  async drained(timeoutMs: number, whileReachable = false): Promise<boolean> {
    if (this.backlog === 0) return true
    if (whileReachable && this.transport.unreachable) return false
    await waitFor(whileReachable ? [this.drainSignal, this.lostSignal] : [this.drainSignal], timeoutMs)
    return this.backlog === 0
  }

  /** Stop for good; events not yet acknowledged stay in the store. */
  close(): void {
    if (this.closed) return
    this.closed = true
    if (this.retryTimer) clearTimeout(this.retryTimer)
    this.options.store?.close()
    this.drainSignal.wake()
    this.lostSignal.wake()
  }

  // -- internals ----------------------------------------------------------------------

  /** The queue is full: the oldest waiting event goes (warned once per outage). */
  private drop(event: Queued): void {
    this.stats.dropped++
    this.droppedThisOutage++
    this.options.store?.done(event.message.episode_id)
    tell(event.onSettled, undefined)
    if (this.droppedThisOutage === 1) {
      this.options.log(
        "warn",
        `event queue full (${this.options.maxQueue}); dropping the oldest events until the bridge catches up`,
      )
    }
  }

  /** The bridge settled an event (stored it, or refused it for good). */
  private settled(event: Queued, ack: Ack): void {
    this.options.store?.done(event.message.episode_id)
    tell(event.onSettled, ack)
  }

  /** Send the next queued event if none is waiting for its ack. */
  private pump(): void {
    if (this.closed || !this.transport.connected || this.inflight || !this.queue.length) return
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
    const id = this.transport.nextId()
    this.inflight = { ...next, id }
    this.stats.sent++
    // On failure the event stays in flight, and lost() puts it first again for the reconnect.
    this.transport.write({ ...next.message, id })
  }
}
