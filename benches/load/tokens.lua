-- wrk script: every request carries the next bearer token from the file named by $TOKENS_FILE
-- (one per line), so a verified-token cache cannot help.
local tokens = {}
local i = 0

function init(args)
  for line in io.lines(os.getenv("TOKENS_FILE")) do
    tokens[#tokens + 1] = "Bearer " .. line
  end
  -- Threads start at different offsets.
  i = math.random(#tokens)
end

function request()
  i = i % #tokens + 1
  return wrk.format(nil, nil, { ["Authorization"] = tokens[i] })
end
