/**
 * Why a handshake failed, and how to say so. The WebSocket API does not show a refused
 * handshake's status, so the plugin asks the same URL with a plain HTTP GET and the same
 * headers, which the bridge answers as it would the handshake (401 for a wrong token, 403
 * for a refused origin).
 */
import type { LogLevel } from "./log.ts"

/** Why the bridge cannot be used: not reachable, refused the token, or another HTTP answer. */
export type Outage = "down" | "token" | `http ${number}`

/** The outage behind a failed handshake, asked over HTTP; "down" when nothing answers. */
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

/** What to log about an outage (a token problem is an error, the rest warnings). */
export function outageReport(
  outage: Outage,
  url: string,
  tokenSet: boolean,
): { level: LogLevel; message: string } {
  const meanwhile = "chats go on without memory and events wait in the queue"
  if (outage === "token") {
    return {
      level: "error",
      message:
        `the bridge at ${url} refused the token: GRAPHITI_BRIDGE_TOKEN is ` +
        `${tokenSet ? "not the bridge's BRIDGE_TOKEN" : "not set, and the bridge wants one"}; ` +
        `${meanwhile} until it matches`,
    }
  }
  if (outage === "down") {
    return {
      level: "warn",
      message: `cannot connect to the bridge at ${url} (is it running?); ${meanwhile} while it retries`,
    }
  }
  return {
    level: "warn",
    message: `the bridge at ${url} refused the connection (${outage.replace("http", "HTTP")}); ${meanwhile} while it retries`,
  }
}
