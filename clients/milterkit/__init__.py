"""The milter wire protocol (v6) and server loop, in pure Python, for both milters.

`milterkit.protocol` encodes and decodes packets within bounded sizes; `milterkit.server`
listens, runs one task per MTA connection with its limits and timeouts, and drains on
shutdown. penalty-milter (`penaltyclient.milter`) and relaycheck-milter
(`relaycheckclient.milter`) stand on it.
"""
