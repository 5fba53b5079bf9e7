"""The shard format and vocabulary contract: ids, conversations, writer, reader, verify."""
