-- Argo CD health of the deeptune.dev resources made of FineTuneJobs (FineTuneSweep: its trials;
-- FederatedFineTune: its sites), from the status the operator writes.
-- Argo CD runs this with Lua's base and table libraries only: no string or math functions.
local hs = {}
local status = obj.status or {}
local spec = obj.spec or {}

local function condition(kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- "Reason: message", or the default when there is no condition.
local function explain(c, default)
  if c == nil then
    return default
  end
  if (c.message or "") == "" then
    return c.reason or default
  end
  return (c.reason or default) .. ": " .. c.message
end

local generation = (obj.metadata or {}).generation
if status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the DeepTune operator to report a status"
elseif generation ~= nil and (status.observedGeneration or 0) < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the DeepTune operator to observe generation " .. generation
elseif status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = explain(condition("Ready"), "Succeeded")
elseif status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = explain(condition("Failed"), "Failed")
elseif status.phase == "Running" and obj.kind == "FineTuneSweep" then
  hs.status = "Progressing"
  hs.message = "Trials: " .. (status.succeeded or 0) .. " succeeded, " .. (status.failed or 0)
    .. " failed, " .. (status.pruned or 0) .. " pruned, " .. (status.running or 0) .. " running of "
    .. (spec.trials or "?")
  local best = status.bestTrial
  if best ~= nil then
    hs.message = hs.message .. "; best so far " .. best.name .. " (" .. best.objective .. ")"
  end
elseif status.phase == "Running" then
  hs.status = "Progressing"
  hs.message = explain(condition("Running"), "Running")
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. status.phase
end
return hs
