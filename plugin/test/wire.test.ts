/**
 * The frames the plugin reads and writes (lib/wire.ts), fed bytes directly: no socket. The
 * plugin's messages are checked against the real bridge in test/plugin.test.ts.
 */
import { decode, encode } from "@msgpack/msgpack"
import { describe, expect, test } from "bun:test"
import { type ServerMessage, SERVER_TYPES } from "../lib/protocol.ts"
import { decodeFrame, encodeFrame } from "../lib/wire.ts"

const REPLIES: ServerMessage[] = [
  { type: "context", id: 1, hit: false, inject: null, elapsed_us: 912 },
  { type: "ack", id: 2, ok: false, error: { code: "bad_request", message: "no", retryable: false } },
  { type: "result", id: "q", episodes: [], context: null },
  { type: "export:chunk", id: 3, seq: 0, episodes: [] },
  { type: "export:end", id: 3, count: 0 },
  { type: "pong", id: null, version: 1 },
]

describe("frames", () => {
  test("every server message reads back from MessagePack and from JSON; a message goes out as MessagePack", () => {
    expect(REPLIES.map((reply) => reply.type).sort()).toEqual([...SERVER_TYPES].sort())
    for (const reply of REPLIES) {
      const bytes = encode(reply)
      expect(decodeFrame(bytes)).toEqual(reply)
      expect(decodeFrame(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength))).toEqual(
        reply,
      )
      expect(decodeFrame(JSON.stringify(reply))).toEqual(reply)
    }
    const message = { type: "file:write", id: 7, path: "/work/shop/a.ts", session: "ses_1" } as const
    expect(decode(encodeFrame(message))).toEqual(message)
  })

  test("a frame that is no server message is refused with the reason", () => {
    expect(() => decodeFrame(encode([1, 2]))).toThrow("a frame must hold one map")
    expect(() => decodeFrame(JSON.stringify({ id: 1 }))).toThrow("no `type`")
    expect(() => decodeFrame(JSON.stringify({ type: "chat:start", id: 1 }))).toThrow(
      'a message of unknown type "chat:start"',
    )
    expect(() => decodeFrame("{not json")).toThrow()
    expect(() => decodeFrame(new Uint8Array([0xc1]))).toThrow()
  })
})
