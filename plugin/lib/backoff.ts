/** Delays between attempts: reconnects to the bridge, and resends of an event it refused. */

/** The delay before a 0-based attempt: capped exponential, with jitter in [d/2, d]. */
export function backoffDelay(attempt: number, initialMs: number, maxMs: number): number {
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30))
  return Math.round(ceiling / 2 + (Math.random() * ceiling) / 2)
}
