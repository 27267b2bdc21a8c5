/**
 * The frames the plugin exchanges with the bridge (docs/protocol.md): each message it sends
 * is a MessagePack map in a binary frame, and each frame it reads is checked to be one of
 * the protocol's server messages. The message types themselves are generated from the
 * bridge's schema (lib/protocol.ts).
 */
import { decode, encode } from "@msgpack/msgpack"
import { type ClientMessage, type EpisodeMessage, SERVER_TYPES, type ServerMessage } from "./protocol.ts"

/** A message without its `id` (each member of a union on its own). */
type WithoutId<T> = T extends unknown ? Omit<T, "id"> : never

/** A message to the bridge as the plugin's parts write it: the client adds `id`. */
export type Outgoing = WithoutId<ClientMessage>
/** An event: a message that becomes an episode and is acknowledged (file:write, error, …). */
export type OutgoingEvent = WithoutId<EpisodeMessage>
/** An event as queued: stamped when it happened, with the id the bridge stores it under. */
export type StampedEvent = OutgoingEvent & { at: number; episode_id: string }
/** A message from the bridge. */
export type Reply = ServerMessage

const SERVER_TYPE_SET: ReadonlySet<string> = new Set(SERVER_TYPES)

/** One message as the bytes of a binary frame. */
export function encodeFrame(message: ClientMessage): Uint8Array {
  return encode(message)
}

/**
 * The server message in a frame (binary: MessagePack, text: JSON). Throws an Error saying
 * what is wrong with a frame that is not one.
 */
export function decodeFrame(data: unknown): Reply {
  const decoded: unknown =
    typeof data === "string"
      ? JSON.parse(data)
      : decode(data instanceof ArrayBuffer ? new Uint8Array(data) : (data as Uint8Array))
  if (!decoded || typeof decoded !== "object" || Array.isArray(decoded)) {
    throw new Error("not a message: a frame must hold one map")
  }
  const type = (decoded as { type?: unknown }).type
  if (typeof type !== "string") throw new Error("not a message: no `type`")
  if (!SERVER_TYPE_SET.has(type)) throw new Error(`a message of unknown type ${JSON.stringify(type)}`)
  return decoded as Reply
}
