-- Argo CD health of a deeptune.dev FineTuneJob, from the status the operator writes.
-- Argo CD runs this with Lua's base and table libraries only: no string or math functions.
local hs = {}
local status = obj.status or {}

local function condition(kind)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- "Reason: message", leaving out a reason that only repeats the phase.
local function explain(c, default)
  if c == nil then
    return default
  end
  local message = c.message or ""
  if c.reason ~= nil and c.reason ~= status.phase then
    if message == "" then
      return c.reason
    end
    return c.reason .. ": " .. message
  end
  if message == "" then
    return default
  end
  return message
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
elseif status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = explain(condition("Suspended"), "Suspended")
elseif status.phase == "Running" then
  hs.status = "Progressing"
  local p = status.progress or {}
  if p.step ~= nil and p.totalSteps ~= nil then
    hs.message = "Training: step " .. p.step .. "/" .. p.totalSteps
    if p.percent ~= nil then
      hs.message = hs.message .. " (" .. p.percent .. "%)"
    end
    if p.eta ~= nil then
      hs.message = hs.message .. ", ETA " .. p.eta
    end
  else
    hs.message = explain(condition("Running"), "Running")
  end
elseif status.phase == "Pending" then
  hs.status = "Progressing"
  hs.message = explain(condition("Ready"), "Pending")
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. status.phase
end
return hs
